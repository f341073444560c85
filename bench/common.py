"""Shared plumbing for bench/ and the tests: ports, the commands that start our function and the
anchors, processes, polling, the page cache, memory and CPU figures, statistics.

bench never imports from tests; tests import from here.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, TypeVar

from handler.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CACHE_DIR", Path.home() / ".cache/coldstart"))
MODEL = Path(os.environ.get("MODEL_URI", CACHE / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
LLAMA_CPP_BIN = Path(os.environ.get("LLAMA_CPP_BIN", CACHE / "llama.cpp-build/bin"))
LAZY_MMAP = CACHE / "lib/liblazy_mmap.so"
RIE = Path(sys.prefix) / "lib/python3.11/site-packages/samcli/local/rapid/aws-lambda-rie-x86_64"
OUT = ROOT / "bench/out"
N_CTX = 2048
THREADS = len(os.sched_getaffinity(0))

T = TypeVar("T")

CHAT = {
    "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
    "max_tokens": 16,
    "temperature": 0,
}


# What the emulator runs by default: our function under awslambdaric, as in production.
AWSLAMBDARIC = [sys.executable, "-m", "awslambdaric", "handler.lambda_function.handler"]
INVOKE_PATH = "/2015-03-31/functions/function/invocations"


def emulator_command(port: int, api_port: int, runtime: list[str] | None = None) -> list[str]:
    """The real Lambda emulator on 127.0.0.1 running `runtime` (default: awslambdaric)."""
    return [
        str(RIE),
        "--runtime-interface-emulator-address",
        f"127.0.0.1:{port}",
        "--runtime-api-address",
        f"127.0.0.1:{api_port}",
        *(runtime or AWSLAMBDARIC),
    ]


def invoke_url(port: int) -> str:
    """The emulator's invocations URL."""
    return f"http://127.0.0.1:{port}{INVOKE_PATH}"


def serve_command(port: int) -> list[str]:
    """Our HTTP server, `python -m handler serve`, on 127.0.0.1:`port`."""
    return [sys.executable, "-m", "handler", "serve", "--host", "127.0.0.1", "--port", str(port)]


def slots_env(model: Path = MODEL, slots: int = 1, threads: int = THREADS) -> dict[str, str]:
    """`python -m handler serve`'s environment on INFERENCE_ENGINE=llama-server, with the CPU
    llama-server that `make bench-anchors` builds."""
    return {
        "MODEL_URI": str(model),
        "INFERENCE_ENGINE": "llama-server",
        "LLAMA_SERVER_BIN": str(LLAMA_CPP_BIN / "llama-server"),
        "PARALLEL_SLOTS": str(slots),
        "N_THREADS": str(threads),
    }


def llama_cpp_server_command(port: int, model: Path = MODEL) -> list[str]:
    """Anchor: llama-cpp-python's own server on `model`, our n_ctx and threads."""
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--n_ctx",
        str(N_CTX),
        "--n_threads",
        str(THREADS),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def llama_server_command(port: int, model: Path = MODEL) -> list[str]:
    """Anchor: llama.cpp's llama-server (`make bench-anchors`) on `model`, our n_ctx and threads."""
    server = require(LLAMA_CPP_BIN / "llama-server", "run `make bench-anchors`")
    return [
        str(server),
        "-m",
        str(model),
        "-c",
        str(N_CTX),
        "-t",
        str(THREADS),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        "1",
    ]


def evict_from_page_cache(path: Path) -> None:
    """Drop the file's clean pages from the page cache (posix_fadvise DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def load_into_page_cache(path: Path) -> None:
    """Read the whole file once so it is in the page cache."""
    with path.open("rb") as f:
        while f.read(16 << 20):
            pass


def post_json(url: str, body: Any, timeout: float = 120) -> dict[str, Any]:
    """POST JSON, return the decoded JSON answer."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def poll(
    check: Callable[[], T],
    timeout_s: float = 60,
    interval_s: float = 0.002,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    retry_on: tuple[type[BaseException], ...] = (OSError,),
) -> T:
    """Call `check` until it returns something true, and return that; `retry_on` errors (default:
    connection errors) count as false. Fails at once if `proc` has exited, and with TimeoutError
    after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode}")
        try:
            if value := check():
                return value
        except retry_on:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"not ready after {timeout_s}s")


def http_ok(url: str) -> bool:
    """True when GET `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False


@contextmanager
def spawn(
    cmd: list[str],
    env: dict[str, str] | None = None,
    *,
    log: IO[bytes] | None = None,
    grace_s: float = 0.0,
    tree: Path = ROOT,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `cmd` in its own process group, stdout and stderr to `log` (else discarded), with
    `env` over ours and the source `tree` (this checkout, or another one to compare against)
    as its working directory and first on PYTHONPATH; always stop the group afterwards."""
    # Keep a PYTHONPATH already set: bench/p6_gpu.sh puts its wheels there.
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)
    output = log if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
        cwd=tree,
        start_new_session=True,
        stdout=output,
        stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        stop(proc, grace_s)


@contextmanager
def emulated_function(
    env: dict[str, str], log: IO[bytes], tree: Path = ROOT
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Our function (from source `tree`) under awslambdaric under the real emulator, output to
    `log`; yields (its invocations URL, the emulator's process) as soon as it is started, not
    yet listening."""
    port, api_port = free_port(), free_port()
    with spawn(emulator_command(port, api_port), env, log=log, tree=tree) as proc:
        yield invoke_url(port), proc


def stop(proc: subprocess.Popen[bytes], grace_s: float = 0.0) -> None:
    """Stop a process group: SIGTERM first when `grace_s` is given (a server then stops its own
    children), SIGKILL if it is still running after that."""
    if proc.poll() is None and grace_s:
        os.killpg(proc.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def emf_records(log: Path) -> list[dict[str, Any]]:
    """The CloudWatch EMF lines our function printed to `log`, decoded."""
    lines = log.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith('{"_aws"')]


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def tree_peak_rss_mb(pid: int) -> float:
    """Largest VmHWM in a process and its children (the runtime under the emulator)."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return max(peak_rss_mb(p.pid) for p in procs)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (VmRSS), in MB."""
    total_kb, stack = 0, [pid]
    while stack:
        current = stack.pop()
        proc = Path(f"/proc/{current}")
        try:
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
            for task in (proc / "task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total_kb / 1024


def cpu_stall_us() -> int | None:
    """Microseconds some task waited for a CPU, machine-wide (PSI); None without PSI."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(first.rsplit("total=", 1)[1])


def cpu_pressure(stall_before: int | None, wall_s: float) -> float | None:
    """Share of `wall_s` in which some task was waiting for a CPU (a busy machine skews times)."""
    stall_after = cpu_stall_us()
    if stall_before is None or stall_after is None or not wall_s:
        return None
    return round((stall_after - stall_before) / (wall_s * 1e6), 3)


TICKS_PER_S = 100  # USER_HZ: /proc's clock ticks on Linux


def cpu_seconds(stat: Path) -> float:
    """utime + stime from a /proc stat file (a process's, or one thread's under task/)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return statistics.median(values)


def percentiles(values: list[float]) -> dict[str, float] | None:
    """p50/p95/p99 (nearest rank), mean and max, rounded to 0.1 ms; None for no values."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]

    summary = {
        "p50": rank(0.50),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "mean": statistics.fmean(ordered),
        "max": ordered[-1],
    }
    return {k: round(v, 4) for k, v in summary.items()}


def fmt(value: float, digits: int = 3) -> str:
    """A number for the results table."""
    return f"{value:.{digits}f}"


def require(path: Path, hint: str) -> Path:
    """Fail with a hint when an anchor binary or model is missing."""
    if not path.exists():
        raise SystemExit(f"missing {path}: {hint}")
    return path
