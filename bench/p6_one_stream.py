"""P6, one stream: where one stream's decode loses against llama-bench's tg128.

llama-bench's tg128 times 128 single-token llama_decode calls: no sampling, no server loop, no
HTTP. One stream through llama-server (and through ours, which relays it) decoded at 0.79-0.86x
of it in every GPU pass of issue 15. This run asks where the rest goes. It starts llama-server
alone with exactly the command line our slot engine gives its child, then with one change at a
time (one slot instead of 64, a unified KV cache, a thread per CPU, flash attention off or on,
CUDA graphs off, sampling on the GPU), then with every change that helped at once ("combined"),
and reads each one's decode rate two ways:

- as llama-server timed it itself (`timings.predicted_per_second` of a buffered /completion):
  its loop, sampling included, without HTTP;
- as a client sees it (a streamed /v1/completions, first chunk to last), as bench.p6_gpu does.

Both with the sampling our engine sends for greedy decoding (`samplers: ["top_k"], top_k: 1`),
beside llama-bench's tg128 as bench.p6_gpu runs it (flash attention "auto") and with it off
and on; ratios are to the first, the issue's anchor. Each variant also runs once with
llama-server's default sampler chain (`temperature: 0` alone), the body llama-server alone gets
in bench.p6_gpu.

Runs on the CPU as a check of the same code path:
    python -m bench.p6_one_stream --model M.gguf --bin ~/.cache/coldstart/llama.cpp-build/bin \
        --ngl 0 --slots 4 --variants shipped one-slot --rounds 1 --tokens 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, free_port, http_ok, poll, post_json, spawn
from bench.p6_gpu import PROMPT_TEXT, SHORT_PROMPT, llama_bench, slug, stop_cleanly_on_sigterm
from bench.p6_gpu import stream as streamed_completion
from handler.config import available_cpus, load_settings
from handler.engine.llama_server.process import child_environment, server_command

GREEDY = {"samplers": ["top_k"], "top_k": 1}

# name -> (what it changes, in words)
VARIANTS = {
    "shipped": "our slot engine's command line",
    "one-slot": "--parallel 1 --ctx-size N_CTX",
    "kv-unified": "--kv-unified (one KV buffer shared by the slots)",
    "threads-all": "--threads = every CPU",
    "fa-off": "--flash-attn off",
    "fa-on": "--flash-attn on",
    "no-cuda-graphs": "GGML_CUDA_DISABLE_GRAPHS=1",
    "backend-sampling": "--backend-sampling (the sampler chain runs on the GPU; experimental)",
}
COMBINED = "combined"
# A change counts as a help when its own decode rate beats the shipped one's by this much.
HELPS = 1.03


def replace_option(command: list[str], option: str, value: str) -> list[str]:
    """`command` with `option`'s value replaced (the option appended when it is absent)."""
    if option not in command:
        return [*command, option, value]
    at = command.index(option)
    return [*command[: at + 1], value, *command[at + 2 :]]


def variant_command(
    names: list[str], base: list[str], env: dict[str, str], n_ctx: int
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment with the changes of `names` applied, in order."""
    command, env = list(base), dict(env)
    for name in names:
        command, env = apply_change(name, command, env, n_ctx)
    return command, env


def apply_change(
    name: str, command: list[str], env: dict[str, str], n_ctx: int
) -> tuple[list[str], dict[str, str]]:
    """One variant's change to a command line and environment."""
    command, env = list(command), dict(env)
    if name == "one-slot":
        command = replace_option(
            replace_option(command, "--parallel", "1"), "--ctx-size", str(n_ctx)
        )
    elif name == "kv-unified":
        command = [("--kv-unified" if arg == "--no-kv-unified" else arg) for arg in command]
    elif name == "threads-all":
        command = replace_option(command, "--threads", str(available_cpus()))
    elif name in ("fa-off", "fa-on"):
        command = replace_option(command, "--flash-attn", name.removeprefix("fa-"))
    elif name == "no-cuda-graphs":
        env["GGML_CUDA_DISABLE_GRAPHS"] = "1"
    elif name == "backend-sampling":
        command = [*command, "--backend-sampling"]
    elif name != "shipped":
        raise ValueError(f"unknown variant {name!r}")
    return command, env


def helping_changes(variants: dict[str, Any]) -> list[str]:
    """The changes whose own decode rate beat the shipped one's by HELPS (of flash attention off
    and on, only the faster), in VARIANTS order; empty when the shipped one did not run."""
    rate = {name: row["server_tps"] for name, row in variants.items() if "server_tps" in row}
    shipped = rate.get("shipped")
    if shipped is None:
        return []
    helped = [
        name for name in VARIANTS if name != "shipped" and rate.get(name, 0) >= HELPS * shipped
    ]
    if "fa-off" in helped and "fa-on" in helped:
        helped.remove("fa-off" if rate["fa-off"] < rate["fa-on"] else "fa-on")
    return helped


def server_timed(port: int, body: dict[str, Any]) -> dict[str, float]:
    """One buffered /completion: llama-server's own decode rate, and the client's wall time."""
    started = time.perf_counter()
    answer = post_json(f"http://127.0.0.1:{port}/completion", body, timeout=600)
    wall = time.perf_counter() - started
    timings = answer["timings"]
    return {
        "predicted_per_second": float(timings["predicted_per_second"]),
        "predicted_n": int(timings["predicted_n"]),
        "wall_s": wall,
    }


def measure(
    name: str, change: str, command: list[str], env: dict[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    """Start one variant, warm it, then its one-stream rates (medians of `args.rounds`)."""
    port = free_port()
    command = replace_option(command, "--port", str(port))
    log = args.out / f"{slug(name)}.log"
    row: dict[str, Any] = {"name": name, "change": change, "command": " ".join(command)}
    if env.get("GGML_CUDA_DISABLE_GRAPHS"):
        row["command"] = "GGML_CUDA_DISABLE_GRAPHS=1 " + row["command"]
    native = {"prompt": SHORT_PROMPT, "n_predict": args.tokens, "ignore_eos": True}
    oai = {"prompt": SHORT_PROMPT, "max_tokens": args.tokens, "ignore_eos": True}
    with log.open("wb") as sink, spawn(command, env, log=sink, grace_s=10) as proc:
        poll(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 300, 0.02, proc=proc)
        # Warm: the first requests set up kernels and buffers; a long prompt sizes them fully.
        server_timed(port, {"prompt": PROMPT_TEXT, "n_predict": 8, **GREEDY})
        for _ in range(2):
            server_timed(port, {**native, **GREEDY})
        row["server_tps"] = statistics.median(
            server_timed(port, {**native, **GREEDY})["predicted_per_second"]
            for _ in range(args.rounds)
        )
        row["client_tps"] = statistics.median(
            streamed_completion(port, {**oai, **GREEDY})["decode_tps"] for _ in range(args.rounds)
        )
        row["server_tps_default_chain"] = server_timed(port, {**native, "temperature": 0})[
            "predicted_per_second"
        ]
    row["log"] = log.name
    print(json.dumps(row), flush=True)
    return row


def report(results: dict[str, Any]) -> str:
    """The markdown table: each variant's rates and their ratio to tg128 as bench.p6_gpu runs it."""
    bench = results.get("llama_bench", {})
    tg = bench.get("tg128", {}).get("avg_ts")
    tg_off = bench.get("tg128 fa0", {}).get("avg_ts")
    tg_on = bench.get("tg128 fa1", {}).get("avg_ts")
    lines = [
        f"llama-bench tg128: {fmt(tg)} tok/s as bench.p6_gpu runs it (flash attention auto), "
        f"{fmt(tg_off)} with it off, {fmt(tg_on)} on",
        "",
        "| variant | change | llama-server's own decode tok/s | x tg128 | client-side streamed "
        "tok/s | x tg128 | own decode, default sampler chain |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in [*VARIANTS, COMBINED]:
        row = results.get("variants", {}).get(name)
        if row is None:
            continue
        if "error" in row:
            lines.append(
                f"| {name} | {row.get('change', '')} | failed: {row['error'][:80]} | | | | |"
            )
            continue
        lines.append(
            f"| {name} | {row['change']} | {fmt(row['server_tps'])} | "
            f"{ratio(row['server_tps'], tg)} | {fmt(row['client_tps'])} | "
            f"{ratio(row['client_tps'], tg)} | {fmt(row['server_tps_default_chain'])} |"
        )
    return "\n".join(lines) + "\n"


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def ratio(value: float, anchor: float | None) -> str:
    return "-" if not anchor else f"{value / anchor:.2f}x"


def bench_all(bin_dir: Path, model: Path, ngl: int) -> dict[str, Any]:
    """llama-bench tg128 as bench.p6_gpu runs it, then with flash attention off and on (pp512
    rides along in each run)."""
    found = llama_bench(bin_dir, model, ngl)
    for fa in ("0", "1"):
        found.update(
            {f"{key} fa{fa}": value for key, value in llama_bench(bin_dir, model, ngl, fa).items()}
        )
    return found


def run_variant(
    name: str,
    changes: list[str],
    change: str,
    *,
    base: list[str],
    child_env: dict[str, str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One variant's row, or its error."""
    command, variant_env = variant_command(changes, base, child_env, args.n_ctx)
    try:
        return measure(name, change, command, variant_env, args)
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, KeyError) as error:
        row = {"name": name, "change": change, "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(row), flush=True)
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--bin", type=Path, required=True, help="llama-bench, llama-server")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/p6-one-stream")
    parser.add_argument("--ngl", type=int, default=-1)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=1024, help="per slot")
    parser.add_argument("--tokens", type=int, default=128, help="decoded per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-bench", action="store_true", help="skip llama-bench")
    parser.add_argument("--no-combined", action="store_true", help="skip the combined variant")
    parser.add_argument("--resume", action="store_true", help="skip what one-stream.json has")
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "one-stream.json"
    results: dict[str, Any] = json.loads(path.read_text()) if args.resume and path.exists() else {}
    results.setdefault("variants", {})

    def save() -> None:
        path.write_text(json.dumps(results, indent=2))

    if not args.no_bench and "llama_bench" not in results:
        results["llama_bench"] = bench_all(args.bin, args.model, args.ngl)
        save()
    env = {
        **os.environ,
        "MODEL_URI": str(args.model),
        "N_CTX": str(args.n_ctx),
        "N_GPU_LAYERS": str(args.ngl),
        "LLAMA_SERVER_BIN": str(args.bin / "llama-server"),
        "PARALLEL_SLOTS": str(args.slots),
        "INFERENCE_ENGINE": "llama-server",
    }
    settings = load_settings(env)
    base = server_command(settings, str(args.model), 0)
    child_env = child_environment(settings, env)
    runs = [(name, [name], VARIANTS[name]) for name in args.variants]
    for name, changes, change in runs:
        if "error" not in results["variants"].get(name, {"error": "not run"}):
            continue
        results["variants"][name] = run_variant(
            name, changes, change, base=base, child_env=child_env, args=args
        )
        save()
    helped = helping_changes(results["variants"])
    if len(helped) > 1 and not args.no_combined:
        change = " + ".join(helped)
        previous = results["variants"].get(COMBINED, {})
        if previous.get("change") != change or "error" in previous:
            results["variants"][COMBINED] = run_variant(
                COMBINED, helped, change, base=base, child_env=child_env, args=args
            )
            save()
    (args.out / "one-stream.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
