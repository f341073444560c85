"""P-serve: spawn -> /readyz 200 of `python -m handler serve` on the llama-server engine, this tree
against another checkout (e.g. the commit before a change), rounds alternating.

    git worktree add /tmp/before <commit> && ln -s $PWD/.venv /tmp/before/.venv
    .venv/bin/python -m bench.p_serve_ready --baseline /tmp/before --rounds 7
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import ROOT, free_port, http_ok, median, poll, serve_command, slots_env, spawn


def time_to_ready(tree: Path) -> float:
    port = free_port()
    env = slots_env()
    started = time.perf_counter()
    with spawn(serve_command(port), env, tree=tree) as proc:
        poll(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), 60, 0.005, proc=proc)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"baseline": [], "this tree": []}
    for _ in range(args.rounds):
        times["baseline"].append(time_to_ready(args.baseline))
        times["this tree"].append(time_to_ready(ROOT))
    for name, values in times.items():
        print(f"{name:10} median {median(values):.3f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"ratio {median(times['this tree']) / median(times['baseline']):.2f}x")


if __name__ == "__main__":
    main()
