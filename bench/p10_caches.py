"""P10: repeat-request speed. TTFT of a request whose 1,500-token system prompt was seen before
(with another prompt in between, so only the prefix state cache can help) vs first seen; and a
cached deterministic answer vs an uncached one. Same process, interleaved, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from bench.common import MODEL, N_CTX, OUT, THREADS, median

WORDS = "Follow the house rules carefully and answer briefly. "


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.update(
        {
            "MODEL_URI": str(MODEL),
            "N_CTX": str(N_CTX),
            "N_THREADS": str(THREADS),
            "RESPONSE_CACHE_ENTRIES": "64",
        }
    )
    from handler.config import load_settings
    from handler.engine.generation import SamplingParams
    from handler.engine.in_process.engine import InProcessEngine
    from handler.service.openai_service import OpenAIService
    from handler.service.schemas import ChatCompletionRequest
    from handler.service.shapes import CHAT

    engine = InProcessEngine(load_settings())
    engine.start()
    engine.wait_loaded(60)
    engine.warm_up()
    service = OpenAIService(engine, engine.settings)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    filler = engine.tokenize("An unrelated short prompt.")
    first_seen: list[float] = []
    seen_before: list[float] = []
    uncached: list[float] = []
    cached: list[float] = []
    prompt_tokens = 0
    for round_no in range(args.rounds):
        system = f"Rule set {round_no}. " + WORDS * 150  # a new system prompt every round
        tokens, _ = engine.chat_prompt(
            [{"role": "system", "content": system}, {"role": "user", "content": "First question?"}]
        )
        prompt_tokens = len(tokens)
        generation = engine.generate(tokens, params)
        generation.text()
        first_seen.append(generation.result.time_to_first_token_s or 0.0)
        engine.generate(filler, params).text()  # the live context now holds something else
        again, _ = engine.chat_prompt(
            [{"role": "system", "content": system}, {"role": "user", "content": "Second question?"}]
        )
        generation = engine.generate(again, params)
        generation.text()
        seen_before.append(generation.result.time_to_first_token_s or 0.0)

        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": f"Colour {round_no}?"}],
            "max_tokens": 16,
            "temperature": 0,
        }
        request = ChatCompletionRequest.model_validate(body)
        started = time.perf_counter()
        service.complete(CHAT, request, None)
        uncached.append(time.perf_counter() - started)
        started = time.perf_counter()
        assert service.complete(CHAT, request, None).get("cached")
        cached.append(time.perf_counter() - started)
    summary = {
        "system_prompt_tokens": prompt_tokens,
        "ttft_first_seen_s": median(first_seen),
        "ttft_seen_before_s": median(seen_before),
        "ttft_ratio": median(seen_before) / median(first_seen),
        "answer_uncached_s": median(uncached),
        "answer_cached_s": median(cached),
        "answer_ratio": median(cached) / median(uncached),
        "prompt_cache": engine.status().extra.get("prompt_cache"),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "p10.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
