"""Start and stop real processes for tests: the HTTP server and the Lambda emulator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port, model_path

RIE = Path(sys.prefix) / "lib/python3.11/site-packages/samcli/local/rapid/aws-lambda-rie-x86_64"


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY",)}
    env.update({"MODEL_URI": str(model_path()), "N_CTX": "1024", "PYTHONPATH": str(ROOT)})
    env.update(extra or {})
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_until(check, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `check()` until true; fail early if `proc` died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"not ready after {timeout_s}s")


@contextmanager
def http_server(env: dict[str, str] | None = None, ready: bool = True) -> Iterator[str]:
    """`python -m handler serve` on a free port; yields the base URL (no /v1)."""
    port = free_port()
    # The log goes to a file: a pipe nobody reads fills after ~64 KB of log lines and then
    # blocks the server mid-request.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "handler", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=_env(env),
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            path = "/readyz" if ready else "/healthz"
            wait_until(lambda: httpx.get(base + path, timeout=1).status_code == 200, 60, proc)
            yield base
        finally:
            _stop(proc)


@contextmanager
def lambda_emulator(
    env: dict[str, str] | None = None, command: list[str] | None = None
) -> Iterator[str]:
    """The real Lambda Runtime Interface Emulator running our handler; yields the invoke URL."""
    port, api_port = free_port(), free_port()
    runtime = command or [sys.executable, "-m", "awslambdaric", "handler.lambda_function.handler"]
    proc = subprocess.Popen(
        [
            str(RIE),
            "--runtime-interface-emulator-address",
            f"127.0.0.1:{port}",
            "--runtime-api-address",
            f"127.0.0.1:{api_port}",
            *runtime,
        ],
        env=_env(env),
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/2015-03-31/functions/function/invocations"
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=1) is not None, 30, proc)
        yield url
    finally:
        _stop(proc)
