"""P-probe-burst: /healthz while many requests start at once, on our API port and on HEALTH_PORT,
against llama-server alone's /health under the same bursts.

A closed loop's clients finish together and start their next requests together; every such
burst is tens of milliseconds of Python work in our process (RESULTS.md), and a probe that comes
meanwhile waits behind it on the API port. HEALTH_PORT's responder is a process of its own that
reads the loop's heartbeat (handler/web/health_responder.py). Each burst here: `--clients`
threads send one streamed one-token completion at the same instant (a barrier), and for
`--probe-s` from then on, a prober alternates fresh-connection GETs on the two ports:

    .venv/bin/python -m bench.p_probe_burst --model /tmp/tiny/tiny.gguf --rounds 2

(the tiny synthetic model from ../shared/gpu/synth_gguf.py: the child's work is small, so the
burst is mostly ours). Then the same bursts against llama-server alone (its /completion, its
/health). Latency percentiles per port over all bursts; the ratio is p99 against llama-server's.
Before its probed bursts, as many unprobed ones give our process's CPU per request: its main
thread's (the event loop's) and its other threads' (pool, collector), from /proc.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    LLAMA_CPP_BIN,
    MODEL,
    cpu_seconds,
    free_port,
    http_ok,
    median,
    percentiles,
    poll,
    serve_command,
    slots_env,
    spawn,
)
from bench.p_probe_cost import fresh_get, llama_server_alone

PROBE_GAP_S = 0.003
SETTLE_S = 0.2  # between bursts: the slots are free again


def get_ms(port: int, path: str) -> float:
    """A GET on a new connection (as a kubelet probes); milliseconds to the whole answer."""
    return fresh_get(port, path.lstrip("/")) * 1000


def post(port: int, path: str, body: bytes) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{path} answered {response.status}")
    finally:
        conn.close()


def bursts(
    send: Callable[[], None],
    probes: dict[str, Callable[[], float]],
    clients: int,
    count: int,
    probe_s: float,
) -> dict[str, list[float]]:
    """`count` bursts of `clients` requests at one instant; each probe's latencies during them."""
    found: dict[str, list[float]] = {name: [] for name in probes}
    errors: list[Exception] = []

    def client(barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            send()
        except (OSError, RuntimeError, http.client.HTTPException) as exc:  # after the burst
            errors.append(exc)

    for _ in range(count):
        barrier = threading.Barrier(clients + 1)
        threads = [threading.Thread(target=client, args=(barrier,)) for _ in range(clients)]
        for thread in threads:
            thread.start()
        barrier.wait()
        until = time.perf_counter() + probe_s
        while probes and time.perf_counter() < until:
            for name, probe in probes.items():
                found[name].append(probe())
            time.sleep(PROBE_GAP_S)
        for thread in threads:
            thread.join()
        if errors:
            raise RuntimeError(f"a burst's request failed: {errors[0]!r}")
        time.sleep(SETTLE_S)
    return found


def thread_cpu_s(pid: int) -> tuple[float, float]:
    """utime + stime of `pid`'s main thread (the event loop) and of its other threads."""
    main = rest = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            seconds = cpu_seconds(task / "stat")
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        if task.name == str(pid):
            main += seconds
        else:
            rest += seconds
    return main, rest


def ours(args: argparse.Namespace) -> dict[str, Any]:
    """Our server on INFERENCE_ENGINE=llama-server with a HEALTH_PORT: first bursts without
    probes, for our CPU per request by thread; then bursts with both ports probed."""
    port, health_port = free_port(), free_port()
    env = {
        **slots_env(args.model, slots=args.clients, threads=1),
        "HEALTH_PORT": str(health_port),
        "MAX_QUEUE": str(args.clients),
        "LOG_LEVEL": "warning",
    }
    body = json.dumps(
        {"prompt": "Hello there", "max_tokens": 1, "temperature": 0, "stream": True}
    ).encode()
    with spawn(serve_command(port), env) as proc:
        poll(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), 60, 0.01, proc=proc)
        poll(lambda: http_ok(f"http://127.0.0.1:{health_port}/readyz"), 30, 0.01, proc=proc)
        before = thread_cpu_s(proc.pid)
        bursts(lambda: post(port, "/v1/completions", body), {}, args.clients, args.bursts, 0.0)
        after = thread_cpu_s(proc.pid)
        requests = args.clients * args.bursts
        cpu = {
            "loop_us": (after[0] - before[0]) / requests * 1e6,
            "other_us": (after[1] - before[1]) / requests * 1e6,
        }
        return cpu, bursts(
            lambda: post(port, "/v1/completions", body),
            {
                "ours /healthz, API port": lambda: get_ms(port, "/healthz"),
                "ours /healthz, HEALTH_PORT": lambda: get_ms(health_port, "/healthz"),
            },
            args.clients,
            args.bursts,
            args.probe_s,
        )


def anchor(args: argparse.Namespace) -> dict[str, list[float]]:
    """llama-server alone, a slot per client: the same bursts on its /completion."""
    port = free_port()
    command = llama_server_alone(
        args.bin, args.model, port, slots=args.clients, ctx=64 * args.clients
    )
    body = json.dumps(
        {"prompt": "Hello there", "n_predict": 1, "temperature": 0, "stream": True}
    ).encode()
    with spawn(command, {}) as proc:
        poll(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 60, 0.01, proc=proc)
        return bursts(
            lambda: post(port, "/completion", body),
            {"llama-server alone /health": lambda: get_ms(port, "/health")},
            args.clients,
            args.bursts,
            args.probe_s,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--bin", type=Path, default=LLAMA_CPP_BIN)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--bursts", type=int, default=20, help="per round")
    parser.add_argument("--probe-s", type=float, default=0.15, help="probing after each start")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rounds: list[dict[str, Any]] = []
    cpu: list[dict[str, float]] = []
    for _ in range(args.rounds):
        ours_cpu, ours_found = ours(args)
        found = {**anchor(args), **ours_found}
        rounds.append({name: percentiles(values) for name, values in found.items()})
        cpu.append(ours_cpu)
    base = median([r["llama-server alone /health"]["p99"] for r in rounds])
    print(f"{'probe':30} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'p99 x llama-server':>19}")
    for name in rounds[0]:
        p50, p99, top = (median([r[name][k] for r in rounds]) for k in ("p50", "p99", "max"))
        print(f"{name:30} {p50:7.1f} {p99:7.1f} {top:7.1f} {p99 / base:18.1f}x")
    loop, other = (median([c[k] for c in cpu]) for k in ("loop_us", "other_us"))
    loops = ", ".join(f"{c['loop_us']:.0f}" for c in cpu)
    others = ", ".join(f"{c['other_us']:.0f}" for c in cpu)
    print(f"our CPU per request in a burst: {loop:.0f} us on the event loop ({loops}), ")
    print(f"{other:.0f} us on the other threads ({others}); /proc counts in 10 ms ticks")
    print("per round (p99 ms): " + "; ".join(
        ", ".join(f"{name.split(' /')[0]} {r[name]['p99']:.1f}" for name in r) for r in rounds
    ))  # fmt: skip


if __name__ == "__main__":
    main()
