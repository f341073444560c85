"""P-stream: our Runtime API loop's response streaming and concurrency, on the real model.

A. Time to first byte, streaming vs buffered, 128 tokens (same run, interleaved, median of N):
   - engine: `InProcessEngine.generate()` called directly -> its first text piece (and the
     engine's own prompt-eval-to-first-token figure);
   - stream: INVOKE_MODE=RESPONSE_STREAM, function URL event with stream=true -> first byte (the
     HTTP prelude), first SSE chunk with a token, last byte;
   - buffered: INVOKE_MODE=BUFFERED (LambdaApp + Mangum, as under awslambdaric), stream=false ->
     the whole response.
   Times are taken at a Runtime API server implementing the documented protocol
   (bench/runtime_api_server.py), from the moment it hands out the event to the arrival of
   each chunk. Every request starts with a fresh nonce so no run reuses another's prompt cache.
B. Peak RSS of `python -m handler runtime` with AWS_LAMBDA_MAX_CONCURRENCY=4 (four invocations in
   flight at once) vs 1, same requests; process-per-request would hold four such processes.

    .venv/bin/python -m bench.p_stream --rounds 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from bench.common import MODEL, N_CTX, OUT, ROOT, THREADS, fmt, median, peak_rss_mb, require
from bench.runtime_api_server import RuntimeAPIServer

MAX_TOKENS = 128
PROMPT = "Write a long story about a dragon who learns to sail."


def messages(nonce: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": f"Session {nonce}. You are a storyteller."},
        {"role": "user", "content": PROMPT},
    ]


def url_event(nonce: str, stream: bool, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    event = json.loads((ROOT / "events/function-url-chat.json").read_text())
    body = {"messages": messages(nonce), "max_tokens": max_tokens, "temperature": 0}
    event["body"] = json.dumps({**body, "stream": stream})
    return event


def settings_env(**extra: Any) -> dict[str, str]:
    env = {"MODEL_URI": str(MODEL), "N_CTX": str(N_CTX), "N_THREADS": str(THREADS)}
    return {**env, **{k.upper(): str(v) for k, v in extra.items()}}


# ----------------------------------------------------------------------------- A: first byte


def start_loop(engine: Any, invoke_mode: str) -> RuntimeAPIServer:
    from handler.aws_lambda.app import LambdaApp
    from handler.aws_lambda.runtime_loop import RuntimeLoop
    from handler.config import load_settings

    settings = load_settings(settings_env(invoke_mode=invoke_mode))
    server = RuntimeAPIServer().__enter__()
    loop = RuntimeLoop(LambdaApp(engine, settings), settings, server.address)
    threading.Thread(target=loop.serve, args=(1,), daemon=True).start()
    return server


def run_engine(engine: Any) -> dict[str, float]:
    from handler.engine.generation import SamplingParams

    tokens, stops = engine.chat_prompt(messages(uuid.uuid4().hex))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop=stops)
    started = time.perf_counter()
    generation = engine.generate(tokens, params)
    pieces = iter(generation)
    next(pieces)
    first = time.perf_counter() - started
    for _ in pieces:
        pass
    result = generation.result
    return {
        "first_piece_s": first,
        "engine_ttft_s": result.time_to_first_token_s or 0.0,
        "total_s": time.perf_counter() - started,
        "tokens": result.completion_tokens,
    }


def run_stream(server: RuntimeAPIServer) -> dict[str, float]:
    request_id = server.invoke(url_event(uuid.uuid4().hex, stream=True))
    result = server.result(request_id)
    handed = server.handed_at[request_id]
    first_token = next(t for t, data in result.chunks if b'"delta":{"content":"' in data)
    chunks = [
        json.loads(e[6:])
        for e in result.split_prelude()[1].decode().split("\n\n")
        if e.startswith("data: {")
    ]
    return {
        "first_byte_s": result.chunks[0][0] - handed,
        "first_token_chunk_s": first_token - handed,
        "total_s": result.done_at - handed,
        "chunks": len(result.chunks),
        "content_chunks": sum(
            1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")
        ),
    }


def run_buffered(server: RuntimeAPIServer) -> dict[str, float]:
    request_id = server.invoke(url_event(uuid.uuid4().hex, stream=False))
    result = server.result(request_id)
    body = json.loads(result.json()["body"])
    return {
        "total_s": result.done_at - server.handed_at[request_id],
        "tokens": body["usage"]["completion_tokens"],
    }


def first_byte(rounds: int) -> dict[str, Any]:
    from handler.config import load_settings
    from handler.engine.in_process.engine import InProcessEngine

    engine = InProcessEngine(load_settings(settings_env()))
    engine.start()
    engine.wait_loaded(120)
    engine.warm_up()
    stream_server, buffered_server = (
        start_loop(engine, "RESPONSE_STREAM"),
        start_loop(engine, "BUFFERED"),
    )
    sides = {
        "engine": lambda: run_engine(engine),
        "stream": lambda: run_stream(stream_server),
        "buffered": lambda: run_buffered(buffered_server),
    }
    for side in sides.values():  # warm both lanes (the FastAPI app is built after a first invoke)
        side()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    names = list(sides)
    for round_no in range(rounds):
        for name in names[round_no % 3 :] + names[: round_no % 3]:  # rotate the order
            runs[name].append(sides[name]())
            print(f"round {round_no} {name:8s} {runs[name][-1]}", file=sys.stderr)
    stream_server.close()
    buffered_server.close()

    def med(name: str, key: str) -> float:
        return median([r[key] for r in runs[name]])

    summary = {
        "engine_first_piece_s": med("engine", "first_piece_s"),
        "engine_ttft_s": med("engine", "engine_ttft_s"),
        "engine_total_s": med("engine", "total_s"),
        "stream_first_byte_s": med("stream", "first_byte_s"),
        "stream_first_token_chunk_s": med("stream", "first_token_chunk_s"),
        "stream_total_s": med("stream", "total_s"),
        "buffered_total_s": med("buffered", "total_s"),
        "tokens": med("buffered", "tokens"),
    }
    summary["first_byte_over_engine_first_piece"] = (
        summary["stream_first_byte_s"] / summary["engine_first_piece_s"]
    )
    summary["first_token_chunk_over_engine_first_piece"] = (
        summary["stream_first_token_chunk_s"] / summary["engine_first_piece_s"]
    )
    summary["first_token_chunk_over_engine_ttft"] = (
        summary["stream_first_token_chunk_s"] / summary["engine_ttft_s"]
    )
    return {"runs": runs, "summary": summary}


# ----------------------------------------------------------------------------- B: peak RSS


def peak_rss(workers: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """Run the runtime as its own process, `requests` streamed chats, `workers` at once."""
    with RuntimeAPIServer() as server:
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            **settings_env(
                invoke_mode="RESPONSE_STREAM",
                aws_lambda_max_concurrency=workers,
                aws_lambda_runtime_api=server.address,
                log_level="warning",
            ),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "handler", "runtime"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            server.wait_waiting(workers, 120)  # init done, every worker on /next
            started = time.perf_counter()
            ids = [
                server.invoke(url_event(uuid.uuid4().hex, True, max_tokens))
                for _ in range(requests)
            ]
            results = [server.result(i) for i in ids]
            wall = time.perf_counter() - started
            rss = peak_rss_mb(proc.pid)
        finally:
            server.close()
            proc.wait(60)
    assert all(r.kind == "stream" and not r.trailers for r in results)
    return {
        "workers": workers,
        "peak_rss_mb": rss,
        "max_in_flight": server.max_in_flight,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rss-requests", type=int, default=8)
    parser.add_argument("--rss-tokens", type=int, default=64)
    args = parser.parse_args()
    require(MODEL, "run `make model`")
    OUT.mkdir(parents=True, exist_ok=True)

    a = first_byte(args.rounds)
    b = [peak_rss(w, args.rss_requests, args.rss_tokens) for w in (1, 4)]
    rss_ratio = b[1]["peak_rss_mb"] / b[0]["peak_rss_mb"]
    report = {
        "first_byte": a["summary"],
        "rss": b,
        "rss_ratio_4_over_1": rss_ratio,
        "process_per_request_4_estimate_mb": 4 * b[0]["peak_rss_mb"],
        "threads": THREADS,
        "n_ctx": N_CTX,
        "rounds": args.rounds,
    }
    (OUT / "p_stream.json").write_text(json.dumps({**report, "runs": a["runs"]}, indent=1))
    s = a["summary"]
    print(json.dumps(report, indent=1))
    print(
        f"\n| measure | median |\n|---|---|\n"
        f"| engine: generate() -> first piece | {fmt(s['engine_first_piece_s'])} s |\n"
        f"| engine: prompt eval -> first token | {fmt(s['engine_ttft_s'])} s |\n"
        f"| stream: first byte (prelude) | {fmt(s['stream_first_byte_s'])} s |\n"
        f"| stream: first chunk with a token | {fmt(s['stream_first_token_chunk_s'])} s |\n"
        f"| stream: last byte | {fmt(s['stream_total_s'])} s |\n"
        f"| buffered: whole response | {fmt(s['buffered_total_s'])} s |\n"
        f"| peak RSS, concurrency 1 | {b[0]['peak_rss_mb']:.0f} MB |\n"
        f"| peak RSS, concurrency 4 | {b[1]['peak_rss_mb']:.0f} MB "
        f"(x{rss_ratio:.2f}; {b[1]['max_in_flight']} in flight) |"
    )


if __name__ == "__main__":
    main()
