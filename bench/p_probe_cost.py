"""P-probe: what a health probe costs our process, against llama-server alone's /health, and
against another checkout of ours; rounds alternating.

Under load a probe's latency is mostly its wait for the event loop and the GIL, which this
2-vCPU machine cannot show (the clients, the child and the prober share its cores: RESULTS.md).
What a probe itself costs the process that answers it can be measured here, and every
microsecond of it is paid again on the loop by the next probe that waits behind it:

    git worktree add /tmp/before <commit> && ln -s $PWD/.venv /tmp/before/.venv
    .venv/bin/python -m bench.p_probe_cost --baseline /tmp/before --rounds 3

Each round: `python -m handler serve` on INFERENCE_ENGINE=llama-server (its child is
llama-server, so the anchor is the same server answering its own /health), then `--probes`
sequential GETs of each path, on a new connection each (as a kubelet or an ALB probes) and on one
kept open; the answering process's utime + stime (all its threads; not its child's), before
and after, from /proc, per probe, and the latency percentiles.
"""

from __future__ import annotations

import argparse
import http.client
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    LLAMA_CPP_BIN,
    MODEL,
    ROOT,
    free_port,
    http_ok,
    median,
    percentiles,
    poll,
    serve_command,
    slots_env,
    spawn,
)
from bench.p_relay_cost import cpu_s

OUR_PATHS = ("healthz", "readyz", "metrics")
ANCHOR_PATH = "health"


def fresh_get(port: int, path: str) -> float:
    """One GET on a new connection (its handshake included); its latency in seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        return kept_get(conn, path)
    finally:
        conn.close()


def kept_get(conn: http.client.HTTPConnection, path: str) -> float:
    """One GET on `conn` (which connects first if it has to); its latency in seconds."""
    started = time.perf_counter()
    conn.request("GET", f"/{path}")
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"/{path} answered {response.status}")
    return time.perf_counter() - started


def probe_costs(pid: int, port: int, paths: tuple[str, ...], probes: int) -> dict[str, Any]:
    """Per path and connection kind: CPU microseconds of `pid` per probe, latency in ms."""
    found: dict[str, Any] = {}
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    ways: dict[str, Callable[[str], float]] = {
        "fresh": lambda path: fresh_get(port, path),
        "kept": lambda path: kept_get(kept, path),
    }
    try:
        for path in paths:
            for way, get in ways.items():
                for _ in range(probes // 10):
                    get(path)  # warm: the first answers build what later ones reuse
                cpu = cpu_s(pid)
                latencies_ms = [get(path) * 1000 for _ in range(probes)]
                found[f"{path} {way}"] = {
                    "cpu_us": (cpu_s(pid) - cpu) / probes * 1e6,
                    "ms": percentiles(latencies_ms),
                }
    finally:
        kept.close()
    return found


def ours(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One round of our server from `tree`."""
    port = free_port()
    env = {**slots_env(args.model, slots=4, threads=1), "LOG_LEVEL": "warning"}
    with spawn(serve_command(port), env, tree=tree) as proc:
        poll(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), 60, 0.01, proc=proc)
        return probe_costs(proc.pid, port, OUR_PATHS, args.probes)


def llama_server_alone(bin_dir: Path, model: Path, port: int, slots: int, ctx: int) -> list[str]:
    """The anchor: llama-server alone on `model` with `slots` slots sharing `ctx` tokens, one
    thread (our child runs with one here too, from slots_env)."""
    return [
        str(bin_dir / "llama-server"),
        *("-m", str(model), "--host", "127.0.0.1", "--port", str(port)),
        *("-np", str(slots), "-t", "1", "-c", str(ctx)),
    ]


def anchor(args: argparse.Namespace) -> dict[str, Any]:
    """One round of llama-server alone, with as many slots as ours."""
    port = free_port()
    command = llama_server_alone(args.bin, args.model, port, slots=4, ctx=4096)
    with spawn(command, {}) as proc:
        poll(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 60, 0.01, proc=proc)
        return probe_costs(proc.pid, port, (ANCHOR_PATH,), args.probes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="another checkout of ours")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--bin", type=Path, default=LLAMA_CPP_BIN)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probes", type=int, default=1000, help="per path and connection kind")
    args = parser.parse_args()
    sides: dict[str, Callable[[], dict[str, Any]]] = {"llama-server alone": lambda: anchor(args)}
    if args.baseline is not None:
        sides["baseline"] = lambda: ours(args.baseline, args)
    sides["this tree"] = lambda: ours(ROOT, args)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, measure in sides.items():
            rounds[name].append(measure())
    anchor_cpu = {
        way: median([r[f"{ANCHOR_PATH} {way}"]["cpu_us"] for r in rounds["llama-server alone"]])
        for way in ("fresh", "kept")
    }
    print(f"{'side':20} {'probe':16} {'CPU us':>8} {'x /health':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for name, found in rounds.items():
        for key in found[0]:
            cpu = median([r[key]["cpu_us"] for r in found])
            p50 = median([r[key]["ms"]["p50"] for r in found])
            p99 = median([r[key]["ms"]["p99"] for r in found])
            ratio = cpu / anchor_cpu[key.split()[-1]]
            print(f"{name:20} {key:16} {cpu:8.1f} {ratio:9.2f}x {p50:8.3f} {p99:8.3f}")


if __name__ == "__main__":
    main()
