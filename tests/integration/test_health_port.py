"""GIVEN `python -m handler serve` with HEALTH_PORT WHEN probes come on that port THEN a process
of its own answers them from what the serving loop posts: 200 while the loop runs, 503 once it
has been stuck HEALTH_STALE_S, readiness by the engine's state; it goes when the server goes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from bench.common import free_port, poll, serve_command
from tests.conftest import ROOT
from tests.integration.servers import _env, http_server_process, wait_until

pytestmark = pytest.mark.integration

STALE_S = 0.5


@contextmanager
def serving(extra: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """The server with a health port; (its process, the API's base URL, the health port's)."""
    health = free_port()
    env = {"HEALTH_PORT": str(health), "HEALTH_STALE_S": str(STALE_S), **extra}
    with http_server_process(env, ready=False) as (proc, base):
        yield proc, base, f"http://127.0.0.1:{health}"


def responder_pids(parent: int) -> list[int]:
    """The health responders whose parent is `parent` (from /proc: no procps needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # ended meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"health_responder" in cmdline:
            found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    """Whether `pid` has ended (a zombie its new parent has not reaped yet counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.ConnectError:
        return True
    return False


def test_the_health_port_answers_like_the_api_port_and_fails_a_stuck_loop():
    with serving({}) as (proc, base, probes):
        wait_until(lambda: httpx.get(probes + "/readyz", timeout=1).status_code == 200, 60)
        ready = httpx.get(probes + "/readyz").json()
        assert ready["state"] == httpx.get(base + "/readyz").json()["state"]
        assert ready["state"] in ("ready", "warm")
        assert httpx.get(probes + "/healthz").json() == {"status": "ok", "state": ready["state"]}
        assert httpx.get(probes + "/v1/models").status_code == 404  # probes only
        # A request moves the state to warm; the board follows within a tick or two.
        body = {"prompt": "The sky is", "max_tokens": 2}
        assert httpx.post(base + "/v1/completions", json=body).status_code == 200
        wait_until(lambda: httpx.get(probes + "/healthz").json()["state"] == "warm", 5)

        # The serving process frozen: its loop posts nothing, so both probes fail once
        # HEALTH_STALE_S has passed, and pass again once it runs.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            time.sleep(STALE_S * 2)
            stalled = httpx.get(probes + "/healthz", timeout=2)
            assert stalled.status_code == 503
            assert stalled.json()["status"] == "stalled"
            assert stalled.json()["silent_s"] >= STALE_S
            assert httpx.get(probes + "/readyz", timeout=2).status_code == 503
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        wait_until(lambda: httpx.get(probes + "/healthz", timeout=1).status_code == 200, 10)


def test_a_failed_model_is_alive_but_not_ready(tmp_path):
    missing = tmp_path / "absent.gguf"
    with serving({"MODEL_URI": str(missing)}) as (_, base, probes):
        wait_until(lambda: httpx.get(base + "/readyz", timeout=1).json()["state"] == "failed", 60)
        wait_until(lambda: httpx.get(probes + "/healthz", timeout=1).status_code == 200, 10)
        assert httpx.get(probes + "/healthz").json() == {"status": "ok", "state": "failed"}
        not_ready = httpx.get(probes + "/readyz")
        assert not_ready.status_code == 503
        assert not_ready.headers["retry-after"] == "60"


def test_the_responder_goes_with_the_server():
    with serving({}) as (proc, _, probes):
        poll(lambda: responder_pids(proc.pid), 10, 0.05)
        [responder] = responder_pids(proc.pid)
        wait_until(lambda: httpx.get(probes + "/healthz", timeout=1).status_code == 200, 10)
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up of its own: the responder sees it go
        proc.wait(10)
        poll(lambda: gone(responder), 10, 0.05)
        assert refused(probes + "/healthz")


def test_a_clean_stop_stops_the_responder_too():
    with serving({}) as (proc, _, probes):
        poll(lambda: responder_pids(proc.pid), 10, 0.05)
        [responder] = responder_pids(proc.pid)
        proc.terminate()
        proc.wait(20)
        poll(lambda: gone(responder), 10, 0.05)
        assert refused(probes + "/healthz")


def test_the_health_port_cannot_be_the_api_port():
    port = free_port()
    done = subprocess.run(
        serve_command(port),
        check=False,
        env=_env({"HEALTH_PORT": str(port)}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"HEALTH_PORT={port} is the API's own port" in done.stderr
