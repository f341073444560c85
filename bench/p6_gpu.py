"""P6: one GPU, our server against llama.cpp's own tools built from the same vendored source.

- llama-bench: prompt (pp512) and decode (tg128) tokens/s, the ceiling for one stream.
- Three servers, each started with the model's pages evicted from the page cache:
  llama.cpp's `llama-server` (the anchor, with exactly the command line our slot engine runs),
  ours with INFERENCE_ENGINE=llama-server (that server behind our adapter), and ours with
  INFERENCE_ENGINE=llama (llama.cpp in our process, one generation at a time).
  For each: load time (spawn to ready), time to first token on the first request (cold) and
  after it (warm), one stream's decode and prompt tokens/s, and aggregate decode tokens/s at
  several concurrency levels (../shared/gpu/conc.py: 128 tokens per request).

Runs on the CPU too (small model, CPU binaries) as a dry run of the same code path:
    python -m bench.p6_gpu --model M.gguf --bin ~/.cache/coldstart/llama.cpp-build/bin \
        --ngl 0 --slots 4 --levels 1 4
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, evict_from_page_cache, free_port, http_ok, poll, serve_command, spawn
from handler.config import load_settings
from handler.engine.llama_server.process import server_command

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


def llama_bench(bin_dir: Path, model: Path, ngl: int) -> dict[str, Any]:
    """llama-bench pp512 and tg128 (5 repetitions each), all layers on the GPU when ngl < 0."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-p", "512", "-n", "128", "-r", "5"]
    cmd += ["-ngl", "99" if ngl < 0 else str(ngl), "-o", "json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    result: dict[str, Any] = {"command": " ".join(cmd)}
    for row in rows:
        key = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        result[key] = {"avg_ts": row["avg_ts"], "stddev_ts": row["stddev_ts"]}
    return result


def concurrency(conc: Path, port: int, levels: list[int]) -> dict[str, float]:
    """Aggregate decode tokens/s per level, from ../shared/gpu/conc.py's output."""
    url = f"http://127.0.0.1:{port}/v1/completions"
    out = subprocess.run(
        [sys.executable, str(conc), url, *map(str, levels)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found = re.findall(r"concurrency (\d+): .* = (\d+) tok/s aggregate", out)
    return {level: float(rate) for level, rate in found}


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


def measure(
    name: str, cmd: list[str], env: dict[str, str], port: int, *, ready_path: str,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """Load, TTFT cold and warm, one stream's rates, then the concurrency levels."""
    evict_from_page_cache(args.model)
    log = args.out / f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.log"
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
        decode = [stream(port, {**short, "max_tokens": 128}) for _ in range(3)]
        row["decode_tps"] = statistics.median(d["decode_tps"] for d in decode)
        row["decode_tokens"] = [d["completion_tokens"] for d in decode]
        # A fresh first word each time: neither side may reuse a cached prompt.
        prompts = [
            stream(port, {"prompt": f"{i} {PROMPT_TEXT}", "max_tokens": 1, "temperature": 0})
            for i in range(5)
        ]
        row["prompt_tokens"] = prompts[0]["prompt_tokens"]
        row["prompt_tps"] = statistics.median(p["prompt_tokens"] / p["ttft_s"] for p in prompts)
        row["prompt_tps_server"] = server_prompt_rate(log.read_text(errors="replace"))
        row["concurrency"] = concurrency(args.conc, port, args.levels)
        row["gpu_memory_mib"] = gpu_memory_mib()
    row["log"] = log.name
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--bin", type=Path, required=True, help="llama-bench, llama-server")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/p6")
    parser.add_argument("--conc", type=Path, default=ROOT.parent / "shared/gpu/conc.py")
    parser.add_argument("--ngl", type=int, default=-1)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=1024, help="per slot")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--only", nargs="*", default=["bench", "anchor", "slots", "llama"])
    parser.add_argument("--resume", action="store_true", help="skip steps already in p6.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "p6.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["model"] = {"path": str(args.model), "bytes": args.model.stat().st_size}
    if args.resume:
        done = {"llama_bench": "bench", "anchor": "anchor", "slots": "slots", "llama": "llama"}
        args.only = [
            step for step in args.only if step not in {done[k] for k in results if k in done}
        ]

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
        "MAX_QUEUE": "1024",
        "LOG_LEVEL": "info",
        "PYTHONUNBUFFERED": "1",
    }
    if "anchor" in args.only:
        port = free_port()
        settings = load_settings({**env, "INFERENCE_ENGINE": "llama-server"})
        cmd = server_command(settings, str(args.model), port)
        results["anchor"] = measure("llama-server", cmd, env, port, ready_path="/health", args=args)
        save()
    if "slots" in args.only:
        port = free_port()
        slots_env = {**env, "INFERENCE_ENGINE": "llama-server"}
        name = "ours INFERENCE_ENGINE=llama-server"
        results["slots"] = measure(
            name, serve_command(port), slots_env, port, ready_path="/readyz", args=args
        )
        save()
    if "llama" in args.only:
        port = free_port()
        llama_env = {**env, "INFERENCE_ENGINE": "llama", "MAX_CONCURRENCY": "1"}
        name = "ours INFERENCE_ENGINE=llama"
        results["llama"] = measure(
            name, serve_command(port), llama_env, port, ready_path="/readyz", args=args
        )
        save()
    print(report(results))
    (args.out / "p6.md").write_text(report(results))


def report(results: dict[str, Any]) -> str:
    """A markdown table of everything measured, with the ratios the issue asks for."""
    lines = []
    bench = results.get("llama_bench", {})
    pp = bench.get("pp512", {}).get("avg_ts")
    tg = bench.get("tg128", {}).get("avg_ts")
    if pp and tg:
        lines.append(f"llama-bench: pp512 {pp:.0f} tok/s, tg128 {tg:.1f} tok/s\n")
    rows = [results[k] for k in ("anchor", "slots", "llama") if k in results]
    if not rows:
        return "\n".join(lines)
    levels = list(rows[0]["concurrency"])
    head = ["server", "load s", "TTFT cold ms", "TTFT warm ms", "decode tok/s", "prompt tok/s"]
    head += [f"x{n} tok/s" for n in levels] + ["GPU MiB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], f"{r['load_s']:.2f}", f"{r['ttft_cold_s'] * 1e3:.1f}"]
        cells += [
            f"{r['ttft_warm_s'] * 1e3:.1f}",
            f"{r['decode_tps']:.1f}",
            f"{r['prompt_tps']:.0f}",
        ]
        cells += [f"{r['concurrency'].get(n, 0):.0f}" for n in levels]
        cells += [f"{r['gpu_memory_mib']:.0f}" if r.get("gpu_memory_mib") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    anchor = results.get("anchor")
    for key in ("slots", "llama"):
        r = results.get(key)
        if not r:
            continue
        ratios = []
        if tg:
            ratios.append(f"decode vs tg128 {r['decode_tps'] / tg:.2f}x")
        if pp:
            ratios.append(f"prompt vs pp512 {r['prompt_tps'] / pp:.2f}x")
        if anchor:
            ratios += [
                f"x{n} {r['concurrency'].get(n, 0) / anchor['concurrency'][n]:.2f}x"
                for n in levels
                if anchor["concurrency"].get(n)
            ]
        lines.append(f"\n{r['name']}: " + ", ".join(ratios) + " (vs llama-server where xN)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
