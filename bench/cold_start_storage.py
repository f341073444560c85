"""Issue 17: spawn -> first token with the model on simulated cold storage, vs the storage floor.

Synthetic llama F16 models (bench/synth_model.py, 0.7 and 2 GB by default) are served through a
throttled network block device (bench/cold_storage.py) on each profile. Every measurement gets a
fresh mount, so the simulated file's page cache is empty and the link's token bucket is new; the
backing file itself is kept in the host's page cache, so only the simulated link is slow. Sides,
interleaved (their order rotates each round):

- floor: 16 threads reading the whole file in disjoint ranges (pread, 8 MiB blocks);
- llama-server: llama.cpp's server (`make bench-anchors`), spawned, /health polled, then asked;
- llama_cpp.server: llama-cpp-python's own server, spawned, polled, then asked;
- coldstart: ours, `python -m awslambdaric handler.lambda_function.handler` under the real Lambda
  Runtime Interface Emulator with MODEL_URI on the mounted file, a function URL chat event posted
  as soon as the emulator listens;
- coldstart-noprefetch: the same with PREFETCH=off (the mmap faults pages in on demand).

Every server gets the same chat request with max_tokens 1 (llama-server on its
/v1/chat/completions, so that all three evaluate the same templated prompt): spawn -> the answer
carrying the first token. Medians of N rounds; ratios to the floor and of ours to each anchor go
to bench/out/cold-storage.json and a markdown table on stdout.

usage: python -m bench.cold_start_storage [--rounds 3] [--sizes 0.7,2] [--profiles latency,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cold_storage import PROFILES, Profile, mounted, parallel_read, resident_bytes
from bench.common import (
    CACHE,
    LAZY_MMAP,
    LLAMA_CPP_BIN,
    N_CTX,
    OUT,
    RIE,
    ROOT,
    THREADS,
    emf_records,
    emulated_function,
    free_port,
    http_ok,
    load_into_page_cache,
    median,
    poll,
    post_json,
    require,
    spawn,
)
from bench.synth_model import write_model

SIDES = ("floor", "llama-server", "llama_cpp.server", "coldstart", "coldstart-noprefetch")
# Ours with the init prefetch turned off: what the prefetch buys, in the same run.
NO_PREFETCH = {"PREFETCH": "off"}
ANCHORS = ("llama-server", "llama_cpp.server")
CHAT: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 1,
    "temperature": 0,
}
READERS = 16
RESULT = OUT / "cold-storage.json"
# Our function's phase timings (seconds) from its EMF line, as recorded in the runs.
EMF_PHASES = {"InitDuration": "init_s", "LoadDuration": "load_s", "TimeToFirstToken": "ttft_s"}

Measure = Callable[[Path, float], dict[str, Any]]


def deadline_s(profile: Profile, size: int) -> float:
    """How long one side may take: generous, a page-at-a-time reader is latency-bound."""
    return 60 + 10 * profile.transfer_seconds(size)


def answered(body: dict[str, Any]) -> dict[str, int]:
    """Prompt and completion tokens of an OpenAI chat answer (a zero-weight model may stop at its
    first token, so completion_tokens can be 0: the token was still evaluated and sampled)."""
    if not body.get("choices"):
        raise AssertionError(f"no choices in {body}")
    usage = body.get("usage") or {}
    return {k: int(usage.get(k, 0)) for k in ("prompt_tokens", "completion_tokens")}


def run_floor(path: Path, timeout_s: float) -> dict[str, Any]:
    """The parallel-read floor on the cold mount."""
    floor = parallel_read(path, READERS)
    return {"total_s": floor.seconds, "mb_per_s": floor.mb_per_s}


def anchor_command(side: str, model: Path, port: int) -> tuple[list[str], str]:
    """An anchor server's command line on 127.0.0.1 and the path that says it is ready."""
    if side == "llama_cpp.server":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model)]
        cmd += ["--n_ctx", str(N_CTX), "--n_threads", str(THREADS)]
        return [*cmd, "--host", "127.0.0.1", "--port", str(port)], "/v1/models"
    server = require(LLAMA_CPP_BIN / "llama-server", "run `make bench-anchors`")
    cmd = [str(server), "-m", str(model), "-c", str(N_CTX), "-t", str(THREADS), "-np", "1"]
    return [*cmd, "--host", "127.0.0.1", "--port", str(port)], "/health"


def run_anchor(side: str, path: Path, timeout_s: float) -> dict[str, Any]:
    """Spawn an anchor, poll until it is ready, ask the chat request; spawn -> answer."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd, ready_path = anchor_command(side, path, port)
    started = time.perf_counter()
    with spawn(cmd):
        poll(lambda: http_ok(base + ready_path), timeout_s)
        ready = time.perf_counter() - started
        body = post_json(base + "/v1/chat/completions", {"model": "m", **CHAT}, timeout_s)
        total = time.perf_counter() - started
    return {"total_s": total, "ready_s": ready, **answered(body)}


def function_url_event() -> dict[str, Any]:
    """events/function-url-chat.json with the bench's chat body."""
    event: dict[str, Any] = json.loads((ROOT / "events/function-url-chat.json").read_text())
    event["body"] = json.dumps(CHAT)
    return event


def ours_env(path: Path, timeout_s: float, extra: dict[str, str]) -> dict[str, str]:
    """Our function's environment over the bench's (spawn adds the repository to PYTHONPATH):
    the mounted model, as `make emulate` and the image run it."""
    env = {
        "MODEL_URI": str(path),
        "N_CTX": str(N_CTX),
        "N_THREADS": str(THREADS),
        "AWS_LAMBDA_FUNCTION_TIMEOUT": str(int(timeout_s)),
        **extra,
    }
    if LAZY_MMAP.is_file():
        env["LD_PRELOAD"] = str(LAZY_MMAP)
    return env


def run_ours(
    path: Path, timeout_s: float, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Spawn the emulator + our runtime, post the function URL event as soon as it listens."""
    event, log_path = function_url_event(), OUT / "cold-storage-ours.log"
    env = ours_env(path, timeout_s, extra_env or {})
    result: dict[str, Any] = {}
    started = time.perf_counter()
    with log_path.open("wb") as log, emulated_function(env, log) as (url, _):

        def invoke() -> bool:
            result.update(post_json(url, event, timeout_s))
            return True

        poll(invoke, timeout_s)
        total = time.perf_counter() - started
    if result.get("statusCode") != 200:
        raise AssertionError(f"function answered {result}")
    emf = next(iter(emf_records(log_path)), {})
    phases = {name: emf[key] for key, name in EMF_PHASES.items() if key in emf}
    return {"total_s": total, **answered(json.loads(result["body"])), **phases}


def measure(side: str) -> Measure:
    """The function that measures `side` on a mounted model."""
    if side == "floor":
        return run_floor
    if side == "coldstart":
        return run_ours
    if side == "coldstart-noprefetch":
        return lambda path, timeout_s: run_ours(path, timeout_s, NO_PREFETCH)
    return lambda path, timeout_s: run_anchor(side, path, timeout_s)


def one_run(side: str, model: Path, profile: Profile) -> dict[str, Any]:
    """One cold measurement: fresh mount, page cache checked empty, then the side."""
    load_into_page_cache(model)  # the backing file: only the simulated link is slow
    with mounted(model, profile) as path:
        cached = resident_bytes(path)
        result = measure(side)(path, deadline_s(profile, model.stat().st_size))
    return {"cached_bytes_before": cached, **result}


def summarise(runs: list[dict[str, Any]], sides: list[str]) -> dict[str, Any]:
    """Medians per model and profile, with ratios to the floor and of ours to each anchor."""
    summary: dict[str, Any] = {}
    for key in dict.fromkeys(r["key"] for r in runs):
        totals = {
            s: [r["total_s"] for r in runs if r["key"] == key and r["side"] == s] for s in sides
        }
        medians = {side: median(t) for side, t in totals.items() if t}
        entry: dict[str, Any] = {"median_s": medians, "n": min(len(t) for t in totals.values())}
        if "floor" in medians:
            entry["vs_floor"] = {side: m / medians["floor"] for side, m in medians.items()}
        if "coldstart" in medians:
            ours = medians["coldstart"]
            entry["ours_vs"] = {a: ours / medians[a] for a in ANCHORS if a in medians}
        summary[key] = entry
    return summary


def cell(entry: dict[str, Any], side: str) -> str:
    """`seconds (x floor)` for the table."""
    seconds = entry["median_s"].get(side)
    if seconds is None:
        return "-"
    ratio = entry.get("vs_floor", {}).get(side)
    return f"{seconds:.2f} s" + (f" ({ratio:.1f}x)" if ratio and side != "floor" else "")


def table(summary: dict[str, Any]) -> str:
    """The markdown table of medians and ratios."""
    lines = [
        "| model / profile | n | floor | llama-server | llama_cpp.server | ours | "
        "ours, PREFETCH=off | ours / llama-server | ours / llama_cpp.server |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in summary.items():
        vs = entry.get("ours_vs", {})
        ratios = [f"{vs[a]:.2f}" if a in vs else "-" for a in ANCHORS]
        cells = [cell(entry, side) for side in SIDES]
        lines.append(f"| {key} | {entry['n']} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def synth_models(sizes: list[float]) -> dict[float, Path]:
    """The synthetic models, written once under the cache."""
    synth_dir = CACHE / "synth"
    synth_dir.mkdir(parents=True, exist_ok=True)
    return {s: write_model(synth_dir / f"llama-{s}gb.gguf", s) for s in sizes}


def parse_sizes(text: str) -> list[float]:
    """`0.7,2` -> [0.7, 2] (ints stay ints: they name the model files)."""
    return [float(s) if "." in s else int(s) for s in text.split(",")]


def run_logged(
    side: str, model: Path, size: float, profile: Profile, round_no: int
) -> dict[str, Any]:
    """One run, its line on stderr; a failure is logged and kept as such."""
    key = f"{size}GB/{profile.name}"
    row: dict[str, Any] = {
        "side": side,
        "key": key,
        "round": round_no,
        "bytes": model.stat().st_size,
    }
    try:
        row.update(one_run(side, model, profile))
    except (OSError, TimeoutError, AssertionError, RuntimeError) as exc:
        print(f"round {round_no} {row['key']} {side}: failed: {exc}", file=sys.stderr)
        return {**row, "error": str(exc)}
    print(f"round {round_no} {row['key']:18s} {side:17s} {row['total_s']:.3f}s", file=sys.stderr)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="0.7,2")
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=1,
        help="answer length; above 1 the request samples at temperature 1 (a zero-weight model's "
        "greedy answer may end at its first token)",
    )
    args = parser.parse_args()
    if args.max_tokens > 1:
        CHAT.update(max_tokens=args.max_tokens, temperature=1.0, seed=7)
    sides, profiles = args.sides.split(","), [PROFILES[p] for p in args.profiles.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    require(RIE, "install the dev extras (aws-sam-cli)")
    models = synth_models(parse_sizes(args.sizes))
    runs: list[dict[str, Any]] = []
    for round_no in range(args.rounds):
        order = sides[round_no % len(sides) :] + sides[: round_no % len(sides)]
        for size, model in models.items():
            for profile in profiles:
                for side in order:
                    runs.append(run_logged(side, model, size, profile, round_no))
    summary = summarise([r for r in runs if "error" not in r], sides)
    report = {
        "command": sys.argv,
        "threads": THREADS,
        "request": CHAT,
        "runs": runs,
        "summary": summary,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(table(summary))


if __name__ == "__main__":
    main()
