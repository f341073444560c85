"""A bounded load runner: replays events/load/ against the HTTP server or the Lambda emulator.

    python -m bench.load --target server   [--requests 60] [--concurrency 4] [--url URL]
    python -m bench.load --target emulator [--requests 30] [--stream-mode]

A closed loop: `--concurrency` threads each send the next event (in file order, cycling) as soon
as their previous answer is complete, until `--requests` are done or `--max-duration-s` passes.
`--warmup` requests go first and are not counted. Without `--url` the target is started here on
127.0.0.1 (the server: `python -m handler serve`; the emulator: the real RIE running awslambdaric,
or our streaming loop with `--stream-mode`) and stopped at the end.

The report (JSON on stdout, and `--out`): QPS, latency percentiles (overall and by prompt size),
time to first token for streamed requests (server only: the emulator hands a stream over whole),
completion tokens per second, errors by kind, and the target's RSS. This is the command line:
the loop and its report are bench/closed_loop.py, the targets bench/load_targets.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from bench import closed_loop
from bench.common import tree_rss_mb
from bench.load_targets import (
    EmulatorTarget,
    ServerTarget,
    Target,
    read_events,
    started_emulator,
    started_server,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--target", choices=("server", "emulator"), default="server")
    parser.add_argument("--url", help="an already running target (server base URL, or invoke URL)")
    parser.add_argument("--requests", type=int, default=60, help="requests counted")
    parser.add_argument(
        "--concurrency", type=int, help="requests in flight (default: server 4, emulator 1)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="uncounted first requests")
    parser.add_argument("--max-duration-s", type=float, default=300.0, help="stop sending after")
    parser.add_argument("--stream-mode", action="store_true", help="emulator: our streaming loop")
    closed_loop.add_run_options(parser)
    args = parser.parse_args(argv)

    events = read_events(args.events)
    env = closed_loop.parse_env(args.env)
    warmup = len(events) if args.warmup is None else args.warmup
    if args.concurrency is None:
        args.concurrency = 4 if args.target == "server" else 1
    if args.target == "emulator" and args.concurrency != 1:
        # The RIE models one execution environment: a second invoke in flight makes it panic
        # (nil pointer dereference) and drop both. Lambda would start another environment.
        parser.error("--target emulator takes --concurrency 1 (the RIE runs one invoke at a time)")

    with _target(args, env) as (target, pid):
        if warmup:
            closed_loop.run(target, events, warmup, 1, max_duration_s=args.max_duration_s)
        rss_start = tree_rss_mb(pid) if pid else None
        loop = closed_loop.run(
            target, events, args.requests, args.concurrency, max_duration_s=args.max_duration_s
        )
        rss = {"start": round(rss_start, 1), "end": round(tree_rss_mb(pid), 1)} if pid else None

    extra = {
        "warmup": warmup,
        "stream_mode": args.stream_mode if args.target == "emulator" else None,
        "env": env,
        "events": [e.name for e in events],
        "command": closed_loop.command_line("bench.load", argv),
    }
    result = closed_loop.report(target, loop, concurrency=args.concurrency, rss=rss, extra=extra)
    closed_loop.write_report(result, args.out)
    print("\n".join(closed_loop.summary_lines(result)), file=sys.stderr)
    return 0


@contextmanager
def _target(args: argparse.Namespace, env: dict[str, str]) -> Iterator[tuple[Target, int | None]]:
    """The target to send to, and the pid to measure when it was started here."""
    if args.target == "server":
        if args.url:
            yield ServerTarget(args.url, args.timeout_s), None
            return
        with started_server(env) as (base, pid):
            yield ServerTarget(base, args.timeout_s), pid
        return
    if args.url:
        yield EmulatorTarget(args.url, args.timeout_s), None
        return
    with started_emulator(env, args.stream_mode, args.timeout_s) as (url, pid):
        yield EmulatorTarget(url, args.timeout_s), pid


if __name__ == "__main__":
    raise SystemExit(main())
