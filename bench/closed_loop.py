"""The closed loop behind `python -m bench.load` and `python -m bench.soak`, and its report.

`--concurrency` threads each send the next event (in file order, cycling) as soon as their
previous answer is complete, until the requests are done or the time is up. The report: QPS,
latency percentiles (overall and by prompt size), time to first token where the target shows it,
completion tokens per second, errors by kind, the target's RSS and the machine's CPU pressure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import cpu_pressure, cpu_stall_us, percentiles
from bench.load_targets import EVENTS_DIR, LoadEvent, Outcome, Target, send_safely


@dataclass
class LoopResult:
    """What one closed loop did: every request's outcome, the wall time, the CPU pressure."""

    outcomes: list[Outcome]
    wall_s: float
    cpu_pressure: float | None


def run(
    target: Target,
    events: list[LoadEvent],
    requests: int,
    concurrency: int,
    *,
    max_duration_s: float,
    on_done: Callable[[int, Outcome], None] | None = None,
) -> LoopResult:
    """Send `requests` events (cycling) from `concurrency` threads, until `max_duration_s`."""
    counter = itertools.count()
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stall = cpu_stall_us()
    started = time.perf_counter()
    stop_at = started + max_duration_s

    def worker() -> None:
        while True:
            i = next(counter)
            if i >= requests or time.perf_counter() >= stop_at:
                return
            item = events[i % len(events)]
            outcome = send_safely(target, item)
            with lock:
                outcomes.append(outcome)
            if on_done is not None:
                on_done(i, outcome)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - started
    return LoopResult(outcomes, wall_s, cpu_pressure(stall, wall_s))


def report(
    target: Target,
    loop: LoopResult,
    *,
    concurrency: int,
    rss: dict[str, float] | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The load report of one loop."""
    outcomes, wall_s = loop.outcomes, loop.wall_s
    ok = [o for o in outcomes if o.kind == "ok"]
    errors = Counter(o.kind for o in outcomes if o.kind != "ok")
    streamed_ok = [o for o in ok if o.stream and o.ttft_s is not None]
    tokens = sum(o.completion_tokens for o in ok)
    by_size = {}
    for size in sorted({o.size for o in outcomes}):
        by_size[size] = {
            "requests": sum(o.size == size for o in outcomes),
            "latency_s": percentiles([o.latency_s for o in ok if o.size == size]),
        }
    return {
        "target": target.name,
        "url": target.base_url,
        "requests": len(outcomes),
        "concurrency": concurrency,
        "streamed": sum(o.stream for o in outcomes),
        "duration_s": round(wall_s, 3),
        "qps": round(len(outcomes) / wall_s, 3) if wall_s else 0.0,
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "error_rate": round(sum(errors.values()) / len(outcomes), 4) if outcomes else 0.0,
        "latency_s": percentiles([o.latency_s for o in ok]),
        "ttft_s": percentiles([o.ttft_s for o in streamed_ok]) if target.ttft_observable else None,
        "completion_tokens": tokens,
        "completion_tokens_per_s": round(tokens / wall_s, 2) if wall_s else 0.0,
        "by_size": by_size,
        "rss_mb": rss,
        "cpu_pressure": loop.cpu_pressure,
        **extra,
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A few lines for people (the JSON has everything)."""
    lat, ttft = result["latency_s"] or {}, result["ttft_s"] or {}
    lines = [
        f"{result['target']}: {result['requests']} requests ({result['streamed']} streamed), "
        f"concurrency {result['concurrency']}, {result['duration_s']:.1f} s, "
        f"{result['qps']:.2f} req/s, {result['completion_tokens_per_s']:.1f} tokens/s",
        f"  latency p50/p95/p99: {lat.get('p50')}/{lat.get('p95')}/{lat.get('p99')} s",
        f"  errors: {result['errors'] or 'none'} (rate {result['error_rate']:.2%})",
    ]
    if ttft:
        lines.insert(2, f"  TTFT p50/p95/p99: {ttft['p50']}/{ttft['p95']}/{ttft['p99']} s")
    if result["rss_mb"]:
        lines.append(f"  target RSS MB: {result['rss_mb']}")
    if result.get("cpu_pressure") is not None:
        lines.append(f"  CPU pressure (time a task waited for a CPU): {result['cpu_pressure']}")
    return lines


# ------------------------------------------------------------------ what both commands share


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options bench.load and bench.soak share: events, timeout, target env, report file."""
    parser.add_argument("--events", type=Path, default=EVENTS_DIR, help="folder of events")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the target")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")


def parse_env(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE pairs from --env."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that made a report, for the report."""
    return f"python -m {module} " + " ".join(argv or sys.argv[1:])


def write_report(result: dict[str, Any], out: Path | None) -> None:
    """The JSON report on stdout, and in `out` when given."""
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
