"""P6 GPU cold start (issue 15): spawn -> first token, page cache dropped, ours vs llama-server.

Per model size, each round runs every side once, in an order that rotates from round to round;
before each run the page cache is dropped (`/proc/sys/vm/drop_caches` as root, else the model
file's pages alone with posix_fadvise) and the GPU is left with no process on it:

- floor (round 0 only): 16 threads reading the whole file in disjoint ranges, the disk's best;
- llama-server: llama.cpp's server as a user starts it, `llama-server -m M -ngl 999 -np S -c
  S*N_CTX` and its defaults otherwise (its own warm-up included); /health polled, then a
  streamed /completion;
- ours: `python -m handler serve` with INFERENCE_ENGINE=llama-server, N_GPU_LAYERS=-1, the same
  slots and context, as the CUDA image runs it (the lazy_mmap shim preloaded when given,
  PREFETCH=auto); /readyz polled, then a streamed /v1/completions;
- ours-noprefetch: the same with PREFETCH=off;
- ours-prev: the same with llama-server's memory fit back on (`--fit on` through
  LLAMA_SERVER_ARGS, as before our command line turned it off) and WARMUP=off.

Each run: spawn -> ready, then three short streamed requests one after the other (a fresh first
word each, so nothing is reused from a cache): spawn -> first token of the first one is the cold
figure; the first request's time to first token against the second's is the warm-up penalty.
Every output line is stamped as it arrives, and so is every line of llama-server's own log (sent
to a FIFO this process reads, on both sides): the waterfall comes from its lines, CUDA init,
its memory fit, metadata and vocabulary, the weights read (the mmap populated) and uploaded, the
context (KV cache, compute buffers), warm-up, listening; then ours: ready, first token.

Writes OUT/cold.json (every run; `--resume` skips runs already there) and OUT/cold.md. Runs on
the CPU too, as a check of the code path (small model, CPU build, `--ngl 0`):
    python -m bench.p6_gpu_cold --model 0.1=M.gguf --bin ~/.cache/coldstart/llama.cpp-build/bin \
        --ngl 0 --slots 2 --rounds 1
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from bench.cold_storage import parallel_read
from bench.common import (
    ROOT,
    evict_from_page_cache,
    free_port,
    http_ok,
    median,
    poll,
    serve_command,
    stop,
)
from bench.p6_gpu import stop_cleanly_on_sigterm
from handler.model_source.prefetch import resident_bytes

SIDES = ("floor", "llama-server", "ours", "ours-noprefetch", "ours-prev")
OURS = {
    "ours": {},
    "ours-noprefetch": {"PREFETCH": "off"},
    "ours-prev": {"LLAMA_SERVER_ARGS": "--fit on", "WARMUP": "off"},
}
PROMPT = "Once upon a time"
REQUESTS = 3
# llama-server's log, trace lines included (the fit, the warm-up), goes to a FIFO that this
# process reads, so its lines are stamped as they arrive for both sides alike.
CHILD_LOG_ENV = {"LLAMA_ARG_LOG_VERBOSITY": "4", "LLAMA_ARG_LOG_COLORS": "off"}
# Marks in the output: (name, pattern, first or last match, the stage that ends there).
MARKS = (
    ("child_spawned", r"coldstart\.llama_server starting ", "first", "python + imports (ours)"),
    ("child_log", r"", "first", "exec + libraries"),
    ("cuda_found", r"ggml_cuda_init: found", "first", "CUDA init (cuInit)"),
    ("devices", r"system_info:", "first", "device query (CUDA context)"),
    ("fit_start", r"fitting params to device memory", "first", "-> memory fit"),
    ("fit_done", r"fitting params to free memory took|failed to fit", "last", "memory fit"),
    ("metadata", r"llama_model_loader: loaded meta data", "last", "-> model metadata"),
    ("tensors_start", r"load_tensors: loading model tensors", "last", "metadata + vocabulary"),
    ("buffers", r"load_tensors: .*model buffer size", "first", "weights read (mmap populate)"),
    ("context", r"llama_context: constructing llama_context", "last", "weights upload"),
    ("reserved", r"sched_reserve: reserve took", "last", "KV cache + compute buffers"),
    ("warmup_start", r"warming up the model", "last", "-> warm-up"),
    ("slots", r"load_model: initializing, n_slots", "last", "warm-up (llama-server's) + slots"),
    ("listening", r"llama_server: listening on|server is listening", "last", "-> listening"),
    ("ours_ready", r"coldstart\.llama_server llama-server ready on port", "first",
     "/health seen, /props (ours)"),
)  # fmt: skip
# The marks the bench itself sets, with the stage that ends at each.
OWN_MARKS = {"ready": "-> ready seen (ours: + warm-up)", "first_token": "first request's TTFT"}
STAGE_ORDER = [label for *_, label in MARKS] + list(OWN_MARKS.values())


def drop_page_cache(model: Path, how: str) -> str:
    """Empty the page cache: all of it where allowed (root) and asked, else the model file's
    pages alone; which of the two."""
    os.sync()
    if how == "drop":
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "drop_caches"
        except OSError:
            pass
    evict_from_page_cache(model)
    return "fadvise"


def gpu_processes() -> list[str]:
    """Compute processes on the GPU (none without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()


Lines = list[tuple[float, str]]


@contextmanager
def stamped(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[Stamped]:
    """Start `cmd` in its own process group from this checkout, with llama-server's log going
    to a FIFO; every line of its output and of that log is stamped (seconds since spawn) as it
    arrives. The group is stopped (SIGTERM, then SIGKILL) and the lines written to `log`."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        fifo = Path(tmp) / "llama-server.log"
        os.mkfifo(fifo)
        run = Stamped(time.perf_counter())
        child_log = threading.Thread(target=run.read, args=(fifo, run.child), daemon=True)
        child_log.start()  # opening the FIFO waits for llama-server to open it
        run.proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env, "LLAMA_ARG_LOG_FILE": str(fifo), "PYTHONPATH": path},
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        output = threading.Thread(target=run.pump, daemon=True)
        output.start()
        try:
            yield run
        finally:
            stop(run.proc, grace_s=10)
            with suppress(OSError):  # a child that never opened the FIFO: let the reader go
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            output.join(5)
            child_log.join(5)
            merged = sorted([*run.output, *((t, f"[log] {line}") for t, line in run.child)])
            log.write_text("".join(f"{t:9.4f} {line}\n" for t, line in merged))


class Stamped:
    """A started process and its lines as they arrived: its output and llama-server's log."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.proc: subprocess.Popen[bytes] | None = None
        self.output: Lines = []
        self.child: Lines = []

    def read(self, source: Path, into: Lines) -> None:
        with source.open("rb") as f:
            for raw in f:
                line = raw.decode("utf-8", "replace").rstrip()
                into.append((time.perf_counter() - self.started, line))

    def pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.output.append((time.perf_counter() - self.started, line))


def first_token(port: int, path: str, body: dict[str, Any]) -> float:
    """Seconds from sending a streamed request to its first data chunk."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{path}: HTTP {response.status} {response.read()[:300]!r}")
    found = None
    for line in response:
        if found is None and line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            chunk = json.loads(line[6:])
            # The first chunk after the first sampled token (random weights may sample an
            # end-of-text first: then that chunk has no text but still came after the token).
            if "content" in chunk or chunk.get("choices"):
                found = time.perf_counter() - started
    conn.close()
    if found is None:
        raise RuntimeError(f"{path}: no token in the answer")
    return found


def request_body(side: str, i: int) -> tuple[str, dict[str, Any]]:
    """The i-th short streamed request of a side: a fresh first word, 8 tokens, greedy."""
    prompt = f"{i} {PROMPT}"
    if side == "llama-server":
        return "/completion", {"prompt": prompt, "n_predict": 8, "top_k": 1, "stream": True}
    return "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}


def readyz(port: int) -> dict[str, Any]:
    """Our /readyz body (phases, prefetch, residency)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
        body: dict[str, Any] = json.loads(response.read())
        return body


def anchor_command(args: argparse.Namespace, model: Path, port: int) -> list[str]:
    """llama-server as a user starts it: every layer on the GPU, our slots and context."""
    cmd = [
        str(args.bin / "llama-server"),
        "-m",
        str(model),
        "-ngl",
        "999" if args.ngl < 0 else str(args.ngl),
    ]
    cmd += ["-np", str(args.slots), "-c", str(args.slots * args.n_ctx)]
    return [*cmd, "--host", "127.0.0.1", "--port", str(port)]


def ours_env(args: argparse.Namespace, model: Path, side: str) -> dict[str, str]:
    """Our server's environment for a side."""
    env = {
        "INFERENCE_ENGINE": "llama-server",
        "MODEL_URI": str(model),
        "N_GPU_LAYERS": str(args.ngl),
        "N_CTX": str(args.n_ctx),
        "PARALLEL_SLOTS": str(args.slots),
        "LLAMA_SERVER_BIN": str(args.bin / "llama-server"),
        "PYTHONUNBUFFERED": "1",
        **OURS[side],
    }
    if args.lazy_mmap:
        env["LD_PRELOAD"] = str(args.lazy_mmap)
    return env


def run_server(args: argparse.Namespace, side: str, model: Path, log: Path) -> dict[str, Any]:
    """One cold run of a server side: spawn -> ready -> first token, three requests, marks."""
    port = free_port()
    if side == "llama-server":
        cmd, env, ready_path = anchor_command(args, model, port), {}, "/health"
    else:
        cmd, env, ready_path = serve_command(port), ours_env(args, model, side), "/readyz"
    row: dict[str, Any] = {}
    with stamped(cmd, {**CHILD_LOG_ENV, **env}, log) as run:
        ready_url = f"http://127.0.0.1:{port}{ready_path}"
        poll(lambda: http_ok(ready_url), args.timeout_s, 0.005, proc=run.proc)
        ready = time.perf_counter() - run.started
        ttfts = [first_token(port, *request_body(side, i)) for i in range(REQUESTS)]
        if ready_path == "/readyz":
            row["status"] = readyz(port)
        row.update(total_s=ready + ttfts[0], ready_s=ready, ttft_s=ttfts)
        time.sleep(0.2)  # the last log lines
    marks = find_marks(run.output, run.child)
    marks.update(ready=ready, first_token=ready + ttfts[0])
    row["marks"] = marks
    row["stages"] = stages(marks)
    return row


def find_marks(output: Lines, child: Lines) -> dict[str, float]:
    """When each mark's line came (seconds since spawn): ours in the output, llama-server's in
    its log, placed by its own timestamps (microseconds since its log began) on this clock;
    `child_log` is that beginning: the process runs, its libraries are loaded."""
    stamps = [(t, child_seconds(line), line) for t, line in child]
    timed = [(t, ts, line) for t, ts, line in stamps if ts is not None]
    zero = min((t - ts for t, ts, _ in timed), default=None)
    at = [(t if ts is None or zero is None else zero + ts, line) for t, ts, line in stamps]
    found: dict[str, float] = {} if zero is None else {"child_log": zero}
    for name, pattern, which, _ in MARKS:
        if name == "child_log":
            continue
        lines = output if name in ("child_spawned", "ours_ready") else at
        times = [t for t, line in lines if re.search(pattern, line)]
        if times:
            found[name] = times[0] if which == "first" else times[-1]
    return found


def child_seconds(line: str) -> float | None:
    """llama-server's timestamp (minutes.seconds.milliseconds.microseconds) of a log line."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)\.(\d+) ", line)
    if not match:
        return None
    minutes, seconds, ms, us = map(int, match.groups())
    return minutes * 60 + seconds + ms / 1e3 + us / 1e6


def stages(marks: dict[str, float]) -> dict[str, float]:
    """The waterfall: the marks seen, in the order they came, each the end of a stage that
    began at the one before (spawn first); the stages add up to spawn -> first token."""
    labels = {name: label for name, *_, label in MARKS} | OWN_MARKS
    found: dict[str, float] = {}
    last = 0.0
    for name, at in sorted(marks.items(), key=lambda item: item[1]):
        found[labels[name]] = found.get(labels[name], 0.0) + at - last
        last = at
    return found


def one_run(
    args: argparse.Namespace, side: str, label: str, model: Path, rnd: int
) -> dict[str, Any]:
    """Page cache dropped, GPU idle, then the side."""
    poll(lambda: not gpu_processes(), 30, 0.1)
    method = drop_page_cache(model, args.cache)
    cached = resident_bytes(model)[0]
    row: dict[str, Any] = {"size": label, "round": rnd, "side": side, "cache": method}
    row["cached_bytes_before"] = cached
    if side == "floor":
        floor = parallel_read(model, 16)
        return {**row, "total_s": floor.seconds, "mb_per_s": floor.mb_per_s}
    log = args.out / f"{label}gb-{side}-r{rnd}.log"
    return {**row, **run_server(args, side, model, log), "log": log.name}


def plan(args: argparse.Namespace) -> Iterator[tuple[int, str, str, Path]]:
    """(round, size, side, model) in run order: round by round, the sides rotated each round."""
    servers = [s for s in args.sides if s != "floor"]
    for rnd in range(args.rounds):
        for label, model in args.models:
            if "floor" in args.sides and rnd == 0:
                yield rnd, label, "floor", model
            shift = rnd % len(servers)
            for side in servers[shift:] + servers[:shift]:
                yield rnd, label, side, model


def machine() -> dict[str, str]:
    """The GPU, driver and CUDA, as nvidia-smi and nvcc report them."""
    found: dict[str, str] = {}
    commands = {
        "gpu": ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,persistence_mode",
                "--format=csv,noheader"],
        "nvidia_smi": ["nvidia-smi"],
        "nvcc": ["nvcc", "--version"],
    }  # fmt: skip
    for key, cmd in commands.items():
        if shutil.which(cmd[0]):
            out = subprocess.run(cmd, check=False, capture_output=True, text=True).stdout
            found[key] = out.strip() if key == "gpu" else summary_line(key, out)
    return found


def summary_line(key: str, out: str) -> str:
    """The CUDA version line of nvidia-smi's table, the release line of nvcc."""
    pattern = r"CUDA Version: [\d.]+" if key == "nvidia_smi" else r"release [\d.]+, V[\d.]+"
    match = re.search(pattern, out)
    return match.group(0) if match else ""


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per size and side: medians of the cold figures and of each stage; ours / llama-server."""
    summary: dict[str, Any] = {}
    for label in dict.fromkeys(r["size"] for r in runs):
        sides: dict[str, Any] = {}
        for side in dict.fromkeys(r["side"] for r in runs if r["size"] == label):
            rows = [r for r in runs if r["size"] == label and r["side"] == side]
            entry: dict[str, Any] = {
                "n": len(rows),
                "total_s": median([r["total_s"] for r in rows]),
            }
            if side != "floor":
                entry["ready_s"] = median([r["ready_s"] for r in rows])
                for i in range(REQUESTS):
                    entry[f"ttft{i + 1}_s"] = median([r["ttft_s"][i] for r in rows])
                names = dict.fromkeys(n for r in rows for n in r["stages"])
                entry["stages"] = {
                    n: median([r["stages"][n] for r in rows if n in r["stages"]]) for n in names
                }
            sides[side] = entry
        anchor = sides.get("llama-server")
        if anchor:
            for side, entry in sides.items():
                if side.startswith("ours"):
                    entry["vs_llama_server"] = entry["total_s"] / anchor["total_s"]
        summary[label] = sides
    return summary


def report(results: dict[str, Any]) -> str:
    """Markdown: the cold figures per size and side, then the waterfall per size."""
    summary = results["summary"]
    head = ["size GB", "side", "n", "spawn -> first token s", "vs llama-server", "ready s"]
    head += ["TTFT 1st / 2nd / 3rd ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, sides in summary.items():
        for side, e in sides.items():
            ratio = f"**{e['vs_llama_server']:.2f}x**" if "vs_llama_server" in e else "-"
            ttft = (
                " / ".join(f"{e[f'ttft{i + 1}_s'] * 1e3:.1f}" for i in range(REQUESTS))
                if "ready_s" in e
                else "-"
            )
            ready = f"{e['ready_s']:.2f}" if "ready_s" in e else "-"
            cells = [label, side, str(e["n"]), f"{e['total_s']:.2f}", ratio, ready, ttft]
            lines.append("| " + " | ".join(cells) + " |")
    for label, sides in summary.items():
        servers = [s for s in sides if s != "floor"]
        names = list(dict.fromkeys(n for s in servers for n in sides[s]["stages"]))
        order = [n for n in STAGE_ORDER if n in names]
        lines += ["", f"Waterfall, {label} GB (medians, s):", ""]
        lines += ["| stage | " + " | ".join(servers) + " |", "|---|" + "---|" * len(servers)]
        for name in order:
            cells = [fmt_s(sides[s]["stages"].get(name)) for s in servers]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fmt_s(value: float | None) -> str:
    """Seconds for a table cell."""
    return "-" if value is None else f"{value:.3f}"


def model_arg(text: str) -> tuple[str, Path]:
    """LABEL=PATH (the label is the size in GB, as the tables show it)."""
    label, _, path = text.partition("=")
    if not path:
        raise argparse.ArgumentTypeError("expected SIZE_GB=PATH")
    return label, Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", dest="models", type=model_arg, action="append", required=True)
    parser.add_argument("--bin", type=Path, required=True, help="folder with llama-server")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/p6-gpu-cold")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--ngl", type=int, default=-1)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=1024, help="per slot")
    parser.add_argument("--lazy-mmap", type=Path, help="liblazy_mmap.so, preloaded for ours")
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument(
        "--cache", choices=["drop", "fadvise"], default="drop",
        help="drop: the whole page cache (root), falling back to fadvise on the model file",
    )  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="skip runs already in cold.json")
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "cold.json"
    results: dict[str, Any] = json.loads(path.read_text()) if args.resume and path.exists() else {}
    results.setdefault("runs", [])
    results["machine"] = machine()
    results["models"] = {
        label: {"path": str(m), "bytes": m.stat().st_size} for label, m in args.models
    }
    results["command"] = " ".join(sys.argv)
    done = {(r["size"], r["round"], r["side"]) for r in results["runs"]}
    for rnd, label, side, model in plan(args):
        if (label, rnd, side) in done:
            continue
        row = one_run(args, side, label, model, rnd)
        results["runs"].append(row)
        results["summary"] = summarise(results["runs"])
        path.write_text(json.dumps(results, indent=2))
        brief = {k: row[k] for k in ("size", "round", "side", "total_s") if k in row}
        print(json.dumps({**brief, "ttft_s": row.get("ttft_s")}), flush=True)
    results["summary"] = summarise(results["runs"])
    path.write_text(json.dumps(results, indent=2))
    (args.out / "cold.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
