"""Soak: many requests against one HTTP server, its resident memory sampled as they complete.

    python -m bench.soak [--requests 1000] [--warmup 100] [--concurrency 2] [--tolerance 0.05]

The events of events/load/ are replayed in order (bench/closed_loop.py, as bench.load does).
The first `--warmup` requests fill what is meant to fill (compute buffers, the prompt state cache,
Python's allocator); from then on every RSS sample must stay within `--tolerance` of the RSS at
the end of the warm-up. The exit status is 1 when memory is not flat or any request failed.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections import Counter
from typing import Any

from bench import closed_loop
from bench.common import percentiles, tree_rss_mb
from bench.load_targets import Outcome, ServerTarget, read_events, started_server


class RSSSampler:
    """RSS of the server's process tree every `every` completed requests (and on demand)."""

    def __init__(self, pid: int, every: int, offset: int) -> None:
        self.pid = pid
        self.every = every
        self.offset = offset  # requests already done before this phase
        self.done = 0
        self.samples: list[tuple[int, float]] = []
        self._lock = threading.Lock()

    def sample(self) -> None:
        """Record (requests done so far, RSS MB)."""
        self.samples.append((self.offset + self.done, round(tree_rss_mb(self.pid), 1)))

    def on_done(self, _: int, __: Outcome) -> None:
        with self._lock:
            self.done += 1
            if self.done % self.every == 0:
                self.sample()


def flatness(samples: list[tuple[int, float]], baseline: float, tolerance: float) -> dict[str, Any]:
    """How far the samples stray from `baseline`, and their trend (least squares)."""
    values = [rss for _, rss in samples]
    deviation = max(abs(v - baseline) for v in values) / baseline
    n = len(samples)
    mean_x = sum(x for x, _ in samples) / n
    mean_y = sum(values) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in samples)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in samples) / var_x if var_x else 0.0
    return {
        "baseline_mb": baseline,
        "min_mb": min(values),
        "max_mb": max(values),
        "final_mb": values[-1],
        "max_deviation": round(deviation, 4),
        "tolerance": tolerance,
        "slope_mb_per_100_requests": round(slope * 100, 3),
        "flat": deviation <= tolerance,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000, help="requests in all")
    parser.add_argument("--warmup", type=int, default=100, help="of which the first are warm-up")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    parser.add_argument("--sample-every", type=int, default=20, help="RSS sample interval")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed RSS deviation")
    closed_loop.add_run_options(parser)
    args = parser.parse_args(argv)
    if not 0 < args.warmup < args.requests:
        parser.error("--warmup must be between 0 and --requests")

    events = read_events(args.events)
    env = closed_loop.parse_env(args.env)
    unbounded = 24 * 3600.0
    with started_server(env) as (base, pid):
        target = ServerTarget(base, args.timeout_s)
        started_rss = round(tree_rss_mb(pid), 1)
        warm = closed_loop.run(
            target, events, args.warmup, args.concurrency, max_duration_s=unbounded
        )
        sampler = RSSSampler(pid, args.sample_every, offset=args.warmup)
        sampler.sample()
        loop = closed_loop.run(
            target,
            events,
            args.requests - args.warmup,
            args.concurrency,
            max_duration_s=unbounded,
            on_done=sampler.on_done,
        )
        if sampler.samples[-1][0] != args.requests:
            sampler.sample()

    baseline = sampler.samples[0][1]
    memory = flatness(sampler.samples, baseline, args.tolerance)
    warm_errors = Counter(o.kind for o in warm.outcomes if o.kind != "ok")
    extra = {
        "requests_sent": len(warm.outcomes) + len(loop.outcomes),
        # The warm-up apart: its first requests pay for page faults and cache fills.
        "warmup": {
            "requests": len(warm.outcomes),
            "duration_s": round(warm.wall_s, 1),
            "errors": dict(sorted(warm_errors.items())),
            "latency_s": percentiles([o.latency_s for o in warm.outcomes if o.kind == "ok"]),
        },
        "memory": {"start_mb": started_rss, **memory, "samples": sampler.samples},
        "env": env,
        "events": [e.name for e in events],
        "command": closed_loop.command_line("bench.soak", argv),
    }
    # QPS, latency and errors of the requests after the warm-up, while RSS was sampled.
    result = closed_loop.report(target, loop, concurrency=args.concurrency, rss=None, extra=extra)
    closed_loop.write_report(result, args.out)
    lines = ["after the warm-up:", *closed_loop.summary_lines(result)]
    lines.append(
        f"  RSS after warm-up {baseline} MB; min/max/final {memory['min_mb']}/"
        f"{memory['max_mb']}/{memory['final_mb']} MB; max deviation "
        f"{memory['max_deviation']:.2%} (tolerance {args.tolerance:.0%}); trend "
        f"{memory['slope_mb_per_100_requests']} MB per 100 requests"
    )
    failed = []
    if not memory["flat"]:
        failed.append("RSS is not flat")
    failures = sum(result["errors"].values()) + sum(warm_errors.values())
    if failures:
        failed.append(f"{failures} requests failed")
    lines.append("  FAILED: " + "; ".join(failed) if failed else "  OK")
    print("\n".join(lines), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
