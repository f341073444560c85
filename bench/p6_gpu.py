"""P6: one GPU, our server against llama.cpp's own tools built from the same vendored source.

- llama-bench: prompt (pp512) and decode (tg128) tokens/s, the ceiling for one stream.
- Three servers, each started with the model's pages evicted from the page cache:
  llama.cpp's `llama-server` (the anchor, with exactly the command line and log threshold our
  slot engine gives its child), ours with INFERENCE_ENGINE=llama-server (that server behind our
  adapter), and ours with INFERENCE_ENGINE=llama (llama.cpp in our process, one generation at a
  time). For each: load time (spawn to ready), time to first token on the first request (cold) and
  after it (warm), one stream's decode and prompt tokens/s, then steady closed loops per
  concurrency level, streamed and buffered (bench/p6_load.py): aggregate decode tokens/s, TTFT,
  latency, and the latency of /healthz and /readyz under that load.
- Our Runtime API loop (`python -m handler runtime`, INFERENCE_ENGINE=llama-server,
  AWS_LAMBDA_MAX_CONCURRENCY = the largest runtime level) against bench/runtime_api_server.py
  handing out as many events at once: function URL events streamed (INVOKE_MODE=RESPONSE_STREAM)
  and direct invokes buffered, the Lambda Managed Instances path.

Runs on the CPU too (small model, CPU binaries, small levels) as a check of the same code path:
    python -m bench.p6_gpu --model M.gguf --bin ~/.cache/coldstart/llama.cpp-build/bin \
        --ngl 0 --slots 4 --levels 1 4 --runtime-levels 4 --llama-levels 1 --window-s 8
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import p6_load
from bench.common import ROOT, evict_from_page_cache, free_port, http_ok, poll, serve_command, spawn
from bench.runtime_api_server import RuntimeAPIServer
from handler.config import available_cpus, load_settings
from handler.engine.llama_server.process import child_environment, server_command

PROMPT_TEXT = "The quick brown fox jumps over the lazy dog near the river bank. " * 40
SHORT_PROMPT = "Once upon a time"


def stream(port: int, body: dict[str, Any]) -> dict[str, float]:
    """One streamed /v1/completions call: time to first chunk, decode rate after it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    conn.request(
        "POST", "/v1/completions", json.dumps(payload), {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first = last = None
    usage: dict[str, int] = {}
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            last = time.perf_counter()
            first = first or last
    conn.close()
    ended = time.perf_counter()
    n = int(usage.get("completion_tokens", 0))
    span = (last or ended) - (first or ended)
    return {
        "ttft_s": (first or ended) - started,
        "total_s": ended - started,
        "prompt_tokens": int(usage.get("prompt_tokens", 0)),
        "completion_tokens": n,
        "decode_tps": (n - 1) / span if n > 1 and span > 0 else 0.0,
    }


def llama_bench(
    bin_dir: Path, model: Path, ngl: int, flash_attn: str | None = None
) -> dict[str, Any]:
    """llama-bench pp512 and tg128 (5 repetitions each), all layers on the GPU when ngl < 0, with
    its default flash attention unless `flash_attn` ("0", "1") is given."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-p", "512", "-n", "128", "-r", "5"]
    cmd += ["-ngl", "99" if ngl < 0 else str(ngl), "-o", "json"]
    cmd += ["-fa", flash_attn] if flash_attn is not None else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    result: dict[str, Any] = {"command": " ".join(cmd)}
    for row in rows:
        key = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        result[key] = {"avg_ts": row["avg_ts"], "stddev_ts": row["stddev_ts"]}
    return result


def server_prompt_rate(log: str) -> float | None:
    """Prompt tokens/s as the server itself timed them (long prompts only), from its log:
    llama-server's `prompt eval time` lines, or our `ttft_s` request lines."""
    theirs = re.findall(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", log)
    ours = re.findall(r"prompt_tokens=(\d+) .*?ttft_s=([\d.]+)", log)
    rates = [int(n) / (float(ms) / 1e3) for ms, n in theirs if int(n) > 100]
    rates += [int(n) / float(s) for n, s in ours if int(n) > 100 and float(s) > 0]
    return statistics.median(rates) if rates else None


def gpu_memory_mib() -> float | None:
    """GPU memory in use, or None without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]) if out else None


def load_levels(
    port: int,
    levels: list[int],
    args: argparse.Namespace,
    *,
    probes: tuple[str, ...],
    health_port: int | None = None,
) -> dict[str, Any]:
    """Closed loops at each level, streamed and buffered, and the latency of the server's health
    paths `probes` under the load (ours: /healthz and /readyz; llama-server: /health), and of
    /healthz on our `health_port`."""
    body = p6_load.request_body(args.max_tokens)
    found: dict[str, Any] = {}
    for mode in args.modes:
        sender = p6_load.HTTPSender(port, body, stream=mode == "stream", keep_alive=args.keep_alive)
        if args.prime_s:
            found[f"{mode} prime"] = prime(sender, max(levels), args.prime_s)
        found[mode] = {
            str(level): p6_load.closed_loop(
                sender,
                level,
                warmup_s=args.warmup_s,
                window_s=args.window_s,
                probe_port=port,
                probe_paths=probes,
                health_port=health_port,
            )
            for level in levels
        }
        print(json.dumps({mode: found[mode]}), flush=True)
    return found


def prime(send: p6_load.Send, clients: int, seconds: float) -> dict[str, Any]:
    """One unreported closed loop at the top level before a mode's measured levels, so that
    every server's windows come after the same history: a fresh llama-server's first phase at a
    level decoded 30% slower per slot than a later one (RESULTS.md, sixth pass). Reported as the
    mode "<mode> prime"."""
    return {str(clients): p6_load.closed_loop(send, clients, warmup_s=0.0, window_s=seconds)}


def measure(
    name: str, cmd: list[str], env: dict[str, str], port: int, *, ready_path: str,
    levels: list[int], args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """Load, TTFT cold and warm, one stream's rates, then the closed loops per level."""
    evict_from_page_cache(args.model)
    log = args.out / f"{slug(name)}.log"
    row: dict[str, Any] = {"name": name, "command": " ".join(cmd)}
    ready_url = f"http://127.0.0.1:{port}{ready_path}"
    # SIGTERM first: our server then stops its own llama-server.
    with log.open("wb") as sink, spawn(cmd, env, log=sink, grace_s=10) as proc:
        t0 = time.perf_counter()
        poll(lambda: http_ok(ready_url) or proc.poll() is not None, 300, 0.01)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: see {log}")
        row["load_s"] = time.perf_counter() - t0
        short = {"prompt": SHORT_PROMPT, "max_tokens": 16, "temperature": 0}
        row["ttft_cold_s"] = stream(port, short)["ttft_s"]
        row["ttft_warm_s"] = statistics.median(stream(port, short)["ttft_s"] for _ in range(5))
        decode = [stream(port, {**short, "max_tokens": args.decode_tokens}) for _ in range(3)]
        row["decode_tps"] = statistics.median(d["decode_tps"] for d in decode)
        row["decode_tokens"] = [d["completion_tokens"] for d in decode]
        # A fresh first word each time: neither side may reuse a cached prompt.
        prompts = [
            stream(port, {"prompt": f"{i} {PROMPT_TEXT}", "max_tokens": 1, "temperature": 0})
            for i in range(args.prompt_rounds)
        ]
        row["prompt_tokens"] = prompts[0]["prompt_tokens"]
        row["prompt_tps"] = statistics.median(p["prompt_tokens"] / p["ttft_s"] for p in prompts)
        row["prompt_tps_server"] = server_prompt_rate(log.read_text(errors="replace"))
        probes = p6_load.OUR_PROBES if ready_path == "/readyz" else (ready_path.strip("/"),)
        health_port = int(env["HEALTH_PORT"]) if "HEALTH_PORT" in env else None
        row["levels"] = load_levels(port, levels, args, probes=probes, health_port=health_port)
        row["gpu_memory_mib"] = gpu_memory_mib()
    row["log"] = log.name
    print(json.dumps(row), flush=True)
    return row


def measure_runtime(env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Our Runtime API loop with as many workers as the largest level: closed loops of streamed
    function URL events and buffered direct invokes, handed out by a Runtime API server."""
    evict_from_page_cache(args.model)
    workers = max(args.runtime_levels)
    name = f"ours runtime loop, AWS_LAMBDA_MAX_CONCURRENCY={workers}"
    log = args.out / "runtime-loop.log"
    template = json.loads((ROOT / "events/function-url-chat.json").read_text())
    event = p6_load.function_url_event(template, p6_load.request_body(args.max_tokens))
    row: dict[str, Any] = {"name": name, "levels": {}}
    with p6_load.roomy(RuntimeAPIServer(deadline_s=600)) as server:
        runtime_env = {
            **env,
            "INFERENCE_ENGINE": "llama-server",
            "AWS_LAMBDA_RUNTIME_API": server.address,
            "AWS_LAMBDA_MAX_CONCURRENCY": str(workers),
            "INVOKE_MODE": "RESPONSE_STREAM",
        }
        cmd = [sys.executable, "-m", "handler", "runtime"]
        with log.open("wb") as sink, spawn(cmd, runtime_env, log=sink, grace_s=10) as proc:
            t0 = time.perf_counter()
            poll(lambda: server.waiting >= workers or proc.poll() is not None, 300, 0.01)
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: see {log}")
            row["ready_s"] = time.perf_counter() - t0  # init, then every worker on /next
            for mode in args.modes:
                sender = p6_load.runtime_sender(server, event, stream=mode == "stream")
                if args.prime_s:
                    row["levels"][f"{mode} prime"] = prime(
                        sender, max(args.runtime_levels), args.prime_s
                    )
                row["levels"][mode] = {
                    str(level): p6_load.closed_loop(
                        sender, level, warmup_s=args.warmup_s, window_s=args.window_s
                    )
                    for level in args.runtime_levels
                }
                print(json.dumps({mode: row["levels"][mode]}), flush=True)
            row["gpu_memory_mib"] = gpu_memory_mib()
            server.close()  # the workers see /next fail and stop; then the process is stopped
    row["log"] = log.name
    print(json.dumps(row), flush=True)
    return row


def slug(name: str) -> str:
    """A file name for a server's log."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# The key each step leaves in p6.json, for --resume.
STEPS = {
    "llama_bench": "bench",
    "anchor": "anchor",
    "anchor_bs": "anchor-bs",
    "slots": "slots",
    "runtime": "runtime",
    "llama": "llama",
}


def stop_cleanly_on_sigterm() -> None:
    """p6_gpu.sh's `timeout` sends SIGTERM: exit through the `finally` blocks, so the servers
    this run started are stopped instead of holding the GPU into the next call."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--bin", type=Path, required=True, help="llama-bench, llama-server")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/p6")
    parser.add_argument("--ngl", type=int, default=-1)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=1024, help="per slot")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--runtime-levels", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--llama-levels", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--modes", nargs="+", default=["stream", "buffered"])
    parser.add_argument("--max-tokens", type=int, default=128, help="per request")
    parser.add_argument("--decode-tokens", type=int, default=128, help="one stream's decode")
    parser.add_argument("--prompt-rounds", type=int, default=5, help="long-prompt requests")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="per level, not measured")
    parser.add_argument("--window-s", type=float, default=12.0, help="per level, measured")
    parser.add_argument(
        "--prime-s", type=float, default=0.0,
        help="per mode: a closed loop at the top level first, not measured (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--only",
        nargs="*",
        default=["bench", "anchor", "slots", "runtime", "llama"],
        help="steps; also anchor-bs: llama-server alone with --backend-sampling",
    )
    parser.add_argument(
        "--keep-alive", action="store_true",
        help="each client keeps its connection open (as the openai client does), not one a request",
    )  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="skip steps already in p6.json")
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "p6.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["model"] = {"path": str(args.model), "bytes": args.model.stat().st_size}
    results["load"] = {
        "max_tokens": args.max_tokens, "warmup_s": args.warmup_s, "window_s": args.window_s,
        "prime_s": args.prime_s, "keep_alive": args.keep_alive,
    }  # fmt: skip
    if args.resume:
        done = {STEPS[k] for k in results if k in STEPS}
        args.only = [step for step in args.only if step not in done]

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2))

    if "bench" in args.only:
        results["llama_bench"] = llama_bench(args.bin, args.model, args.ngl)
        print(json.dumps(results["llama_bench"]), flush=True)
        save()
    env = {
        **os.environ,
        "MODEL_URI": str(args.model),
        "N_CTX": str(args.n_ctx),
        "N_GPU_LAYERS": str(args.ngl),
        "LLAMA_SERVER_BIN": str(args.bin / "llama-server"),
        "PARALLEL_SLOTS": str(args.slots),
        "MAX_QUEUE": str(max(1024, *args.runtime_levels, *args.levels)),
        "LOG_LEVEL": "info",
        "PYTHONUNBUFFERED": "1",
    }
    # llama-server alone keeps a thread per CPU (as in every earlier run) unless N_THREADS is set;
    # ours picks its own default (4 with every layer on the GPU).
    anchor_env = {"N_THREADS": str(available_cpus()), **env, "INFERENCE_ENGINE": "llama-server"}
    if "anchor" in args.only:
        port = free_port()
        settings = load_settings(anchor_env)
        cmd = server_command(settings, str(args.model), port)
        results["anchor"] = measure(
            "llama-server", cmd, child_environment(settings, env), port, ready_path="/health",
            levels=args.levels, args=args,
        )  # fmt: skip
        save()
    if "anchor-bs" in args.only:
        # llama-server alone with backend sampling for every request (`--backend-sampling`),
        # what ours asks for per request on a GPU (BACKEND_SAMPLING=auto).
        port = free_port()
        settings = load_settings(anchor_env)
        cmd = [*server_command(settings, str(args.model), port), "--backend-sampling"]
        results["anchor_bs"] = measure(
            "llama-server --backend-sampling", cmd, child_environment(settings, env), port,
            ready_path="/health",
            levels=args.levels, args=args,
        )  # fmt: skip
        save()
    if "slots" in args.only:
        port = free_port()
        slots_env = {**env, "INFERENCE_ENGINE": "llama-server", "HEALTH_PORT": str(free_port())}
        name = "ours INFERENCE_ENGINE=llama-server"
        results["slots"] = measure(
            name, serve_command(port), slots_env, port, ready_path="/readyz",
            levels=args.levels, args=args,
        )  # fmt: skip
        save()
    if "runtime" in args.only:
        results["runtime"] = measure_runtime(env, args)
        save()
    if "llama" in args.only:
        port = free_port()
        llama_env = {**env, "INFERENCE_ENGINE": "llama", "MAX_CONCURRENCY": "1"}
        llama_env["HEALTH_PORT"] = str(free_port())
        name = "ours INFERENCE_ENGINE=llama"
        results["llama"] = measure(
            name, serve_command(port), llama_env, port, ready_path="/readyz",
            levels=args.llama_levels, args=args,
        )  # fmt: skip
        save()
    print(report(results))
    (args.out / "p6.md").write_text(report(results))


def report(results: dict[str, Any]) -> str:
    """Markdown tables of everything measured, with the ratios the issue asks for."""
    lines = []
    bench = results.get("llama_bench", {})
    pp = bench.get("pp512", {}).get("avg_ts")
    tg = bench.get("tg128", {}).get("avg_ts")
    if pp and tg:
        lines.append(f"llama-bench: pp512 {pp:.0f} tok/s, tg128 {tg:.1f} tok/s\n")
    servers = [results[k] for k in ("anchor", "anchor_bs", "slots", "llama") if k in results]
    if servers:
        head = ["server", "load s", "TTFT cold ms", "TTFT warm ms", "decode tok/s", "prompt tok/s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in servers:
            cells = [r["name"], f"{r['load_s']:.2f}", f"{r['ttft_cold_s'] * 1e3:.1f}"]
            cells += [f"{r['ttft_warm_s'] * 1e3:.1f}", f"{r['decode_tps']:.1f}"]
            cells += [f"{r['prompt_tps']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += level_table(results)
    for key in ("anchor_bs", "slots", "runtime", "llama"):
        r = results.get(key)
        if r:
            lines.append(f"\n{r['name']}: " + ", ".join(ratios(r, results, tg, pp)))
    return "\n".join(lines)


def level_table(results: dict[str, Any]) -> list[str]:
    """One row per server, mode and level: aggregate tokens/s, TTFT and probe latencies."""
    head = ["server", "mode", "clients", "tok/s", "TTFT p50 ms", "TTFT p99 ms"]
    head += ["latency p50 s", "/healthz (llama-server: /health) p50/p99/max ms"]
    head += ["/readyz p50/p99 ms", "HEALTH_PORT /healthz p50/p99/max ms"]
    head += ["loop wake-ups late > 5/10/25 ms"]
    head += ["/healthz > 10 ms: n (requests begun meanwhile, for the rest)", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in ("anchor", "anchor_bs", "slots", "runtime", "llama"):
        r = results.get(key)
        for mode, levels in (r or {}).get("levels", {}).items():
            for level, f in levels.items():
                ttft, lat = f.get("ttft_s") or {}, f.get("latency_s") or {}
                cells = [r["name"], mode, level, f"{f['tokens_per_s']:.0f}"]
                cells += [ms(ttft.get("p50")), ms(ttft.get("p99")), str(lat.get("p50", "-"))]
                health = f.get("healthz_ms") or f.get("health_ms")
                cells += [probe_cell(health, top=True), probe_cell(f.get("readyz_ms"))]
                cells += [probe_cell(f.get("port_healthz_ms"), top=True)]
                cells += [lag_cell(f.get("loop_lag"))]
                company = f.get("healthz_company") or f.get("health_company")
                cells += [company_cell(company), str(sum(f["errors"].values()))]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratios(
    r: dict[str, Any], results: dict[str, Any], tg: float | None, pp: float | None
) -> list[str]:
    """A server's rates against the anchors: llama-bench, and llama-server at the same level."""
    found = []
    if tg and r.get("decode_tps"):
        found.append(f"decode vs tg128 {r['decode_tps'] / tg:.2f}x")
    if pp and r.get("prompt_tps"):
        found.append(f"prompt vs pp512 {r['prompt_tps'] / pp:.2f}x")
    anchor = results.get("anchor", {}).get("levels", {})
    for mode, levels in r.get("levels", {}).items():
        for level, f in levels.items():
            base = anchor.get(mode, {}).get(level, {}).get("tokens_per_s")
            if base:
                found.append(f"{mode} x{level} {f['tokens_per_s'] / base:.2f}x")
    return [*found, "(xN: vs llama-server alone at the same level and mode)"]


def ms(seconds: float | None) -> str:
    """Seconds as milliseconds for a table cell."""
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def probe_cell(found: dict[str, float] | None, top: bool = False) -> str:
    """p50/p99 (and with `top`, the slowest) of a probe's latency."""
    if not found:
        return "-"
    cell = f"{found['p50']:.1f}/{found['p99']:.1f}"
    return f"{cell}/{found['max']:.1f}" if top else cell


def company_cell(found: dict[str, float] | None) -> str:
    """Slow probes: how many, and the requests begun while they waited against the others'."""
    if not found:
        return "-"
    return f"{found['slow']} ({found['slow_company']:g}, {found['fast_company']:g})"


def lag_cell(found: dict[str, int] | None) -> str:
    """Of the window's wake-ups of our loop, how many came more than 5/10/25 ms late."""
    if not found:
        return "-"
    return f"{found['over_5ms']}/{found['over_10ms']}/{found['over_25ms']} of {found['wakeups']}"


if __name__ == "__main__":
    main()
