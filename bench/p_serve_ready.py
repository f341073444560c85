"""P-serve: `python -m handler serve` on the llama-server engine, this tree against another
checkout (e.g. the commit before a change), rounds alternating: exec -> llama-server's child
spawned (the log's "starting" line) and exec -> /readyz 200.

    git worktree add /tmp/before <commit> && ln -s $PWD/.venv /tmp/before/.venv
    .venv/bin/python -m bench.p_serve_ready --baseline /tmp/before --rounds 7 [--drop-caches]

`--drop-caches` (root) empties the whole page cache before each start, so Python and every module
are read from the disk as on a cold start.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, free_port, http_ok, median, poll, serve_command, slots_env, spawn

# Our log line just before the child's exec (handler/engine/llama_server/process.py).
SPAWN_LINE = re.compile(r"^(\S+ \S+) INFO coldstart\.llama_server starting ", re.MULTILINE)


def start_once(tree: Path, drop_caches: bool) -> tuple[float, float]:
    """(exec -> child spawned, exec -> ready) in seconds for one start of `tree`'s server."""
    if drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    port = free_port()
    with tempfile.TemporaryFile() as log:
        started_wall, started = time.time(), time.perf_counter()
        with spawn(serve_command(port), slots_env(), tree=tree, log=log) as proc:
            poll(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), 60, 0.005, proc=proc)
            ready = time.perf_counter() - started
        log.seek(0)
        found = SPAWN_LINE.search(log.read().decode(errors="replace"))
    if found is None:
        raise RuntimeError("no 'starting' line in the server's log")
    stamp = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")  # local time
    return stamp.timestamp() - started_wall, ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--drop-caches", action="store_true", help="root: before every start")
    args = parser.parse_args()
    trees = {"baseline": args.baseline, "this tree": ROOT}
    found: dict[str, dict[str, list[float]]] = {n: {"spawn": [], "ready": []} for n in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            spawned, ready = start_once(tree, args.drop_caches)
            found[name]["spawn"].append(spawned)
            found[name]["ready"].append(ready)
    for stage in ("spawn", "ready"):
        for name, stages in found.items():
            values = stages[stage]
            shown = ", ".join(f"{v:.3f}" for v in values)
            print(f"{stage:5} {name:10} median {median(values):.3f} s  ({shown})")
        ratio = median(found["this tree"][stage]) / median(found["baseline"][stage])
        print(f"{stage:5} ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
