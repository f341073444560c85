"""P-relay: what our process spends per generated token on INFERENCE_ENGINE=llama-server, this
tree against another checkout, rounds alternating.

On the GPU machine our process relays thousands of tokens a second between llama-server's child
and the clients; its CPU time and thread wakeups per token decide how much it competes with the
child and how long `/healthz` waits for the GIL. Throughput on this 2-vCPU machine is noise (the
client, the child and our process share the cores), but the CPU time our own process used,
divided by the tokens it relayed, is a property of our code:

    git worktree add /tmp/before <commit> && ln -s $PWD/.venv /tmp/before/.venv
    .venv/bin/python -m bench.p_relay_cost --baseline /tmp/before --rounds 3

Each round: `python -m handler serve` (4 slots), then `--requests` closed-loop requests of
`--max-tokens` tokens from `--clients` clients, streamed, then buffered; our process's utime +
stime (all its threads', those that ended included; not the child's), before and after, from
/proc. (Context switches are not counted: /proc has them only per live thread, and the baseline's
threads per request end before they could be read.)
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

from bench import p6_load
from bench.common import (
    MODEL,
    ROOT,
    cpu_seconds,
    free_port,
    http_ok,
    median,
    poll,
    serve_command,
    slots_env,
    spawn,
)


def cpu_s(pid: int) -> float:
    """utime + stime of the process `pid` itself (its threads, not its children)."""
    return cpu_seconds(Path(f"/proc/{pid}/stat"))


def load(port: int, clients: int, requests: int, body: dict[str, Any], stream: bool) -> int:
    """`requests` requests from `clients` closed-loop clients; the tokens answered."""
    send = p6_load.HTTPSender(port, body, stream=stream)
    left = [requests]
    tokens = [0]
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            sample = send()
            if sample.error is not None:
                raise RuntimeError(f"request failed: {sample.error}")
            with lock:
                tokens[0] += sample.tokens

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tokens[0]


def one_round(tree: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Per mode: our process's CPU microseconds per token."""
    port = free_port()
    env = {**slots_env(args.model, slots=args.clients, threads=1), "LOG_LEVEL": "warning"}
    body = p6_load.request_body(args.max_tokens)
    found: dict[str, dict[str, float]] = {}
    with spawn(serve_command(port), env, tree=tree) as proc:
        poll(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), 60, 0.01, proc=proc)
        load(port, args.clients, args.clients * 2, body, stream=True)  # warm
        for mode in ("stream", "buffered"):
            cpu = cpu_s(proc.pid)
            tokens = load(port, args.clients, args.requests, body, stream=mode == "stream")
            found[mode] = {"cpu_us_per_token": (cpu_s(proc.pid) - cpu) / tokens * 1e6}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    trees = {"baseline": args.baseline, "this tree": ROOT}
    rounds: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            rounds[name].append(one_round(tree, args))
    for mode in ("stream", "buffered"):
        for figure in ("cpu_us_per_token",):
            values = {name: [r[mode][figure] for r in found] for name, found in rounds.items()}
            medians = {name: median(v) for name, v in values.items()}
            print(
                f"{mode:8} {figure:19} baseline {medians['baseline']:8.1f}  "
                f"this tree {medians['this tree']:8.1f}  "
                f"ratio {medians['this tree'] / medians['baseline']:.2f}x  "
                f"({', '.join(f'{v:.1f}' for v in values['this tree'])} against "
                f"{', '.join(f'{v:.1f}' for v in values['baseline'])})"
            )


if __name__ == "__main__":
    main()
