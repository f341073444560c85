"""A measuring worker in its own process, driven over stdin/stdout by a benchmark.

Each side of a comparison lives in its own process (its own llama.cpp thread pool), and the
parent interleaves requests between them. Commands: `run N` -> one completion of up to N
tokens; the reply is `RESULT seconds completion_tokens`, timed inside the worker around the call
only (other stdout lines, e.g. EMF, are skipped).

usage: python -m bench.worker handler-direct|handler-url|direct
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bench.common import MODEL, N_CTX, ROOT, THREADS

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"


def handler_side(kind: str) -> Any:
    import os

    os.environ.setdefault("MODEL_URI", str(MODEL))
    os.environ.setdefault("N_CTX", str(N_CTX))
    os.environ.setdefault("N_THREADS", str(THREADS))
    from handler.lambda_function import handler

    class Context:
        def get_remaining_time_in_millis(self) -> int:
            return 600_000

    template = json.loads((ROOT / "events/function-url-chat.json").read_text())

    def run(n: int) -> int:
        body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0}
        if kind == "handler-direct":
            result = handler(body, Context())
        else:
            event = {**template, "rawPath": "/v1/completions", "body": json.dumps(body)}
            event["requestContext"] = {
                **template["requestContext"],
                "http": {**template["requestContext"]["http"], "path": "/v1/completions"},
            }
            result = json.loads(handler(event, Context())["body"])
        return int(result["usage"]["completion_tokens"])

    return run


def llama_cpp_side() -> Any:
    """The same llama.cpp calls the engine makes (tokenize, prefix-reusing prompt evaluation,
    one sampled token, its text), straight on the C API: no thread hop, no validation, no JSON.
    llama-cpp-python's `Llama.create_completion` is not used: on an exactly repeated prompt it
    skips evaluation altogether, so it would not do the same work."""
    from handler.engine.in_process import bindings as backend

    backend.init_backend(verbose=False)
    model = backend.Model(str(MODEL), 0)
    context = backend.Context(model, N_CTX, 512, THREADS)
    config = backend.SamplerConfig(
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        repeat_penalty=1.0,
        seed=0,
    )

    def run(n: int) -> int:
        sampler = backend.Sampler(config, model.n_vocab)
        context.evaluate_prompt(model.tokenize(PROMPT, add_special=True, parse_special=False))
        produced = 0
        while True:
            token = sampler.sample(context)
            if model.is_end_of_generation(token):
                break
            model.piece(token)
            produced += 1
            if produced >= n:
                break
            context.append(token)
        sampler.close()
        return produced

    return run


def main() -> None:
    kind = sys.argv[1]
    run = llama_cpp_side() if kind == "direct" else handler_side(kind)
    run(1)  # warm
    print("RESULT ready", flush=True)
    for line in sys.stdin:
        n = int(line.split()[1])
        started = time.perf_counter()
        tokens = run(n)
        print(f"RESULT {time.perf_counter() - started:.6f} {tokens}", flush=True)


if __name__ == "__main__":
    main()
