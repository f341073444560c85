"""SnapStart: the first request after a restore against warm requests, in the same process.

Our Runtime API loop (`python -m handler runtime`) runs with AWS_LAMBDA_INITIALIZATION_TYPE=
snap-start against the Runtime API server of bench/runtime_api_server.py, which implements the
restore lifecycle: init and the before-snapshot hook run, the runtime asks for the snapshot
(`/runtime/restore/next`), the server restores it, then N chat requests are sent.
The first request's time to first token (from the function's EMF line) is compared with the
median of the warm ones that follow, each with a different user message of the same length;
the target (issue 17) is <= 1.1x. Also recorded: the time
from spawn to the snapshot request (what publishing pays), the process's peak RSS, and the same
first-vs-warm ratio without SnapStart (a plain cold start, WARMUP=lazy) for contrast.

usage: python -m bench.p_snapstart [--requests 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import LAZY_MMAP, MODEL, N_CTX, OUT, ROOT, THREADS, median, peak_rss_mb
from bench.runtime_api_server import RuntimeAPIServer

# Every request asks about something else (the first word differs), so a warm request reuses
# only what any request after the first does: the chat template's opening, not its own prompt.
TOPICS = ("Sea", "Moon", "Rain", "Snow", "Wind", "Fire", "Sand", "Rock", "Lake", "Star", "Leaf")


def chat(i: int) -> dict[str, Any]:
    """The i-th request: the same length and shape, a different topic."""
    topic = TOPICS[i % len(TOPICS)]
    return {
        "messages": [{"role": "user", "content": f"{topic}: write a short poem about it."}],
        "max_tokens": 16,
        "temperature": 0,
    }


def run(snap_start: bool, requests: int) -> dict[str, Any]:
    """One process: (snapshot, restore,) then `requests` identical chats; their EMF TTFTs."""
    log_path = OUT / "snapstart.log"
    with RuntimeAPIServer() as server, log_path.open("wb") as log:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "MODEL_URI": str(MODEL),
            "N_CTX": str(N_CTX),
            "N_THREADS": str(THREADS),
            "AWS_LAMBDA_RUNTIME_API": server.address,
            "AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start" if snap_start else "on-demand",
            **({"LD_PRELOAD": str(LAZY_MMAP)} if LAZY_MMAP.is_file() else {}),
        }
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "handler", "runtime"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            snapshot_s = None
            if snap_start:
                server.wait_snapshot(300)
                snapshot_s = time.perf_counter() - started
                server.restore()
            for i in range(requests):
                answer = server.result(server.invoke(chat(i)), 120).json()
                assert answer["choices"][0]["message"]["content"], answer
            rss = peak_rss_mb(proc.pid)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    ttfts = [r["TimeToFirstToken"] for r in emf_records(log_path) if "TimeToFirstToken" in r]
    return {
        "snapshot_s": snapshot_s,
        "first_ttft_s": ttfts[0],
        "warm_ttft_s": median(ttfts[1:]),
        "ratio": ttfts[0] / median(ttfts[1:]),
        "rss_mb": rss,
    }


def emf_records(log: Path) -> list[dict[str, Any]]:
    """The EMF lines the function printed."""
    lines = log.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith('{"_aws"')]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {"snap-start": [], "on-demand": []}
    for round_no in range(args.rounds):
        for kind, results in runs.items():
            result = run(kind == "snap-start", args.requests)
            results.append(result)
            print(f"round {round_no} {kind:10s} {json.dumps(result)}", file=sys.stderr)
    summary = {
        kind: {
            key: median([r[key] for r in results if r[key] is not None] or [0.0])
            for key in ("snapshot_s", "first_ttft_s", "warm_ttft_s", "ratio", "rss_mb")
        }
        for kind, results in runs.items()
    }
    (OUT / "p_snapstart.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
