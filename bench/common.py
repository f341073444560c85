"""Shared benchmark plumbing: processes, page cache, polling, statistics, anchors."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CACHE_DIR", Path.home() / ".cache/coldstart"))
MODEL = Path(os.environ.get("MODEL_URI", CACHE / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
LLAMA_CPP_BIN = Path(os.environ.get("LLAMA_CPP_BIN", CACHE / "llama.cpp-build/bin"))
LAZY_MMAP = CACHE / "lib/liblazy_mmap.so"
RIE = Path(sys.prefix) / "lib/python3.11/site-packages/samcli/local/rapid/aws-lambda-rie-x86_64"
OUT = ROOT / "bench/out"
N_CTX = 2048
THREADS = len(os.sched_getaffinity(0))

CHAT = {
    "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
    "max_tokens": 16,
    "temperature": 0,
}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def emulator_command(port: int, api_port: int) -> list[str]:
    """The real Lambda emulator running our function with awslambdaric, as in production."""
    return [
        str(RIE),
        "--runtime-interface-emulator-address",
        f"127.0.0.1:{port}",
        "--runtime-api-address",
        f"127.0.0.1:{api_port}",
        sys.executable,
        "-m",
        "awslambdaric",
        "handler.lambda_function.handler",
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


def poll(check: Callable[[], bool], timeout_s: float = 60, interval_s: float = 0.002) -> None:
    """Call `check` until it returns True (connection errors count as False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(interval_s)
    raise TimeoutError("not ready in time")


def http_ok(url: str) -> bool:
    """True when GET `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False


@contextmanager
def spawn(cmd: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Start a process group quietly; always kill it afterwards."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(
        cmd,
        env=full_env,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


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


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return statistics.median(values)


def fmt(value: float, digits: int = 3) -> str:
    """A number for the results table."""
    return f"{value:.{digits}f}"


def require(path: Path, hint: str) -> Path:
    """Fail with a hint when an anchor binary or model is missing."""
    if not path.exists():
        raise SystemExit(f"missing {path}: {hint}")
    return path
