"""Start and stop real processes for tests: the HTTP server and the Lambda emulator.

The commands, ports and polling are bench/common.py's, shared with the benchmarks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

import httpx

from bench.common import emulator_command, free_port, invoke_url, poll, serve_command, stop
from tests.conftest import ROOT, model_path

LOG_TAIL_CHARS = 2000


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY",)}
    env.update({"MODEL_URI": str(model_path()), "N_CTX": "1024", "PYTHONPATH": str(ROOT)})
    env.update(extra or {})
    return env


def wait_until(
    check: Callable[[], bool],
    timeout_s: float,
    proc: subprocess.Popen[bytes] | None = None,
    log: IO[bytes] | None = None,
) -> None:
    """Poll `check()` until true (httpx errors count as not yet); fail early if `proc` died,
    with the tail of its `log`."""
    try:
        poll(check, timeout_s, 0.05, proc=proc, retry_on=(httpx.HTTPError,))
    except (RuntimeError, TimeoutError) as exc:
        if log is None:
            raise
        log.seek(0)
        tail = log.read().decode("utf-8", "replace")[-LOG_TAIL_CHARS:]
        raise type(exc)(f"{exc}; its log ends:\n{tail}") from None


@contextmanager
def http_server(env: dict[str, str] | None = None, ready: bool = True) -> Iterator[str]:
    """`python -m handler serve` on a free port; yields the base URL (no /v1)."""
    with http_server_process(env, ready) as (_, base):
        yield base


@contextmanager
def http_server_process(
    env: dict[str, str] | None = None, ready: bool = True
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`http_server`, yielding its process too (for a test that signals it)."""
    port = free_port()
    # The log goes to a file: a pipe nobody reads fills after ~64 KB of log lines and then
    # blocks the server mid-request.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            serve_command(port),
            env=_env(env),
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            path = "/readyz" if ready else "/healthz"
            wait_until(lambda: httpx.get(base + path, timeout=1).status_code == 200, 60, proc, log)
            yield proc, base
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)  # a test that stopped it must not hang here
            stop(proc, grace_s=10)


@contextmanager
def lambda_emulator(
    env: dict[str, str] | None = None, command: list[str] | None = None
) -> Iterator[str]:
    """The real Lambda Runtime Interface Emulator running our handler (awslambdaric, or
    `command`); yields the invoke URL."""
    port, api_port = free_port(), free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            emulator_command(port, api_port, command),
            env=_env(env),
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_until(lambda: httpx.get(url, timeout=1) is not None, 30, proc, log)
            yield invoke_url(port)
        finally:
            stop(proc, grace_s=10)
