"""P3 warm decode tokens/s and P4 adapter overhead, interleaved, same model and threads.

P3: decode tokens/s = 127 / (T(128 tokens) - T(1 token)) on a cached prompt, through the Lambda
handler (direct invoke and function URL event), through the HTTP server, and through
llama-cpp-python's own server; anchor: llama.cpp's `llama-bench` tg128 (decode only, no sampling).
P4: a warm 1-token request through the handler vs the same llama.cpp calls made directly on the
C API (bench/worker.py says why not `Llama.create_completion`), each in its own process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    LLAMA_CPP_BIN,
    MODEL,
    N_CTX,
    OUT,
    ROOT,
    THREADS,
    free_port,
    http_ok,
    llama_cpp_server_command,
    median,
    poll,
    post_json,
    require,
    serve_command,
    spawn,
)
from bench.worker import PROMPT

LONG = 128


class Worker:
    """A bench.worker process."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", kind],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._read()

    def _read(self) -> list[str]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.kind} died")
            if line.startswith("RESULT "):
                return line.split()[1:]

    def run(self, n: int) -> tuple[float, int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        seconds, tokens = self._read()
        return float(seconds), int(tokens)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def http_run(base: str, n: int) -> tuple[float, int]:
    started = time.perf_counter()
    body = post_json(
        base + "/v1/completions",
        {"model": "m", "prompt": PROMPT, "max_tokens": n, "temperature": 0},
    )
    return time.perf_counter() - started, int(body["usage"]["completion_tokens"])


def llama_bench() -> float:
    binary = require(LLAMA_CPP_BIN / "llama-bench", "run `make bench-anchors`")
    out = subprocess.run(
        [
            str(binary),
            "-m",
            str(MODEL),
            "-t",
            str(THREADS),
            "-p",
            "0",
            "-n",
            str(LONG),
            "-r",
            "3",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(json.loads(out)[0]["avg_ts"])


def decode_rate(run: Any) -> float:
    t1, _ = run(1)
    tl, tokens = run(LONG)
    if tokens < 32:
        raise RuntimeError(f"expected up to {LONG} tokens, got only {tokens}")
    return (tokens - 1) / (tl - t1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--p4-requests", type=int, default=20)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rates: dict[str, list[float]] = {
        k: [] for k in ("llama-bench", "handler", "handler-url", "server", "llama_cpp.server")
    }
    p4: dict[str, list[float]] = {"handler-direct": [], "handler-url": [], "direct": []}
    ours_port, theirs_port = free_port(), free_port()
    env = {"MODEL_URI": str(MODEL), "N_CTX": str(N_CTX), "N_THREADS": str(THREADS)}
    with spawn(serve_command(ours_port), env), spawn(llama_cpp_server_command(theirs_port)):
        ours = f"http://127.0.0.1:{ours_port}"
        theirs = f"http://127.0.0.1:{theirs_port}"
        poll(lambda: http_ok(ours + "/readyz"), 60)
        poll(lambda: http_ok(theirs + "/v1/models"), 60)
        workers = {k: Worker(k) for k in p4}
        try:
            for round_no in range(args.rounds):
                rates["llama-bench"].append(llama_bench())
                rates["handler"].append(decode_rate(workers["handler-direct"].run))
                rates["handler-url"].append(decode_rate(workers["handler-url"].run))
                rates["server"].append(decode_rate(lambda n: http_run(ours, n)))
                rates["llama_cpp.server"].append(decode_rate(lambda n: http_run(theirs, n)))
                print(
                    f"round {round_no}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()),
                    file=sys.stderr,
                )
                for _ in range(args.p4_requests):
                    for kind, worker in workers.items():
                        p4[kind].append(worker.run(1)[0])
        finally:
            for worker in workers.values():
                worker.close()
    anchor = median(rates["llama-bench"])
    summary: dict[str, Any] = {
        "p3_tokens_per_s": {k: median(v) for k, v in rates.items()},
        "p3_ratio_vs_llama_bench": {k: median(v) / anchor for k, v in rates.items()},
        "p4_ms": {k: median(v) * 1000 for k, v in p4.items()},
    }
    summary["p4_overhead_ms"] = {
        k: summary["p4_ms"][k] - summary["p4_ms"]["direct"]
        for k in ("handler-direct", "handler-url")
    }
    (OUT / "p3_p4.json").write_text(
        json.dumps({"rates": rates, "p4": p4, "summary": summary}, indent=1)
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
