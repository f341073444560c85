"""P1: spawn -> first chat completion (16 tokens), ours under the real Lambda emulator vs anchors.

Anchors, same model, n_ctx and threads: llama-cpp-python's own server and llama.cpp's llama-server
(built from the source vendored in the llama-cpp-python sdist). Each side runs with the model file
in the page cache and evicted from it; runs are interleaved; the median of N rounds is reported.
Also records our phase timings (from the EMF line the function prints) for the waterfall, and the
function's peak RSS (P7).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
from pathlib import Path
from typing import Any

from bench.common import (
    CHAT,
    LAZY_MMAP,
    MODEL,
    N_CTX,
    OUT,
    RIE,
    ROOT,
    THREADS,
    emf_records,
    emulated_function,
    evict_from_page_cache,
    free_port,
    http_ok,
    llama_cpp_server_command,
    llama_server_command,
    load_into_page_cache,
    median,
    poll,
    post_json,
    require,
    spawn,
    tree_peak_rss_mb,
)

SIDES = ("coldstart", "llama_cpp.server", "llama-server")


def function_url_event() -> dict[str, Any]:
    event = json.loads((ROOT / "events/function-url-chat.json").read_text())
    event["body"] = json.dumps(CHAT)
    return event


def run_ours(extra_env: dict[str, str] | None = None, tree: Path = ROOT) -> dict[str, Any]:
    """Spawn the emulator + our runtime (from source `tree`), invoke the function URL event as
    soon as it listens."""
    env = {
        "MODEL_URI": str(MODEL),
        "N_CTX": str(N_CTX),
        "N_THREADS": str(THREADS),
        "AWS_LAMBDA_FUNCTION_TIMEOUT": "60",
        **(extra_env or {}),
    }
    if LAZY_MMAP.is_file():  # as `make emulate` and the image run it; anchors run as shipped
        env["LD_PRELOAD"] = str(LAZY_MMAP)
    event = function_url_event()
    log_path = OUT / "ours-stdout.log"
    started = time.perf_counter()
    with log_path.open("wb") as log, emulated_function(env, log, tree) as (url, proc):
        result = poll(lambda: post_json(url, event), 60)
        elapsed = time.perf_counter() - started
        rss = tree_peak_rss_mb(proc.pid)
    body = json.loads(result["body"])
    assert body["usage"]["completion_tokens"] == 16, body
    emf = emf_records(log_path)
    return {"total_s": elapsed, "rss_mb": rss, "emf": emf[0] if emf else {}}


def run_anchor(side: str) -> dict[str, Any]:
    """Spawn an anchor server, poll until it answers, then ask the same chat completion."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if side == "llama_cpp.server":
        cmd, ready_url = llama_cpp_server_command(port), base + "/v1/models"
    else:
        cmd, ready_url = llama_server_command(port), base + "/health"
    started = time.perf_counter()
    with spawn(cmd) as proc:
        poll(lambda: http_ok(ready_url), 60)
        ready = time.perf_counter() - started
        body = post_json(base + "/v1/chat/completions", {"model": "m", **CHAT})
        elapsed = time.perf_counter() - started
        rss = tree_peak_rss_mb(proc.pid)
    assert body["usage"]["completion_tokens"] == 16, body
    return {"total_s": elapsed, "ready_s": ready, "rss_mb": rss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument(
        "--baseline",
        type=Path,
        action="append",
        default=[],
        help="another checkout of this repository (e.g. `git worktree add /tmp/base main~1`), "
        "repeatable: adds the side coldstart@<its folder name>, run from it in the same rounds",
    )
    args = parser.parse_args()
    baselines = {f"coldstart@{path.name}": path for path in args.baseline}
    sides = args.sides.split(",") + list(baselines)
    OUT.mkdir(parents=True, exist_ok=True)
    require(RIE, "install the dev extras (aws-sam-cli)")
    runs: list[dict[str, Any]] = []
    for round_no in range(args.rounds):
        for cache in ("warm", "evicted"):
            for side in sides:
                if cache == "warm":
                    load_into_page_cache(MODEL)
                else:
                    evict_from_page_cache(MODEL)
                try:
                    if side == "coldstart":
                        result = run_ours()
                    elif side in baselines:
                        result = run_ours(tree=baselines[side])
                    else:
                        result = run_anchor(side)
                except (urllib.error.URLError, TimeoutError, AssertionError) as exc:
                    print(f"{side} {cache}: failed: {exc}", file=sys.stderr)
                    continue
                runs.append({"side": side, "cache": cache, "round": round_no, **result})
                print(
                    f"round {round_no} {cache:7s} {side:17s} {result['total_s']:.3f}s",
                    file=sys.stderr,
                )
    summary: dict[str, Any] = {}
    for cache in ("warm", "evicted"):
        for side in sides:
            totals = [r["total_s"] for r in runs if r["side"] == side and r["cache"] == cache]
            if totals:
                summary[f"{side}/{cache}"] = {
                    "median_s": median(totals),
                    "n": len(totals),
                    "rss_mb": median(
                        [r["rss_mb"] for r in runs if r["side"] == side and r["cache"] == cache]
                    ),
                }
    path = OUT / "p1.json"
    path.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
