"""GIVEN a Runtime API server that implements SnapStart's restore lifecycle, and the function with
AWS_LAMBDA_INITIALIZATION_TYPE=snap-start WHEN it starts THEN init ends with a loaded, warm and
resident model before the runtime asks for the snapshot (`/runtime/restore/next`), the first
invoke after the restore counts as a restore, a failing after-restore hook is reported on
`/runtime/restore/error`, and two restores of one state sample differently.

Both runtimes: ours (`python -m handler runtime`) and awslambdaric (`python -m awslambdaric
handler.lambda_function.handler`, hooks registered through snapshot_restore_py).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.common import LAZY_MMAP
from bench.runtime_api_server import RuntimeAPIServer
from handler.aws_lambda import snapstart
from handler.aws_lambda.app import LambdaApp
from handler.engine import EngineState
from handler.engine.in_process.engine import InProcessEngine
from tests.conftest import ROOT, FakeContext, load_event, make_settings, model_path

pytestmark = pytest.mark.integration

RUNTIMES = {
    "coldstart": [sys.executable, "-m", "handler", "runtime"],
    "awslambdaric": [sys.executable, "-m", "awslambdaric", "handler.lambda_function.handler"],
}


def chat_event(max_tokens: int = 8, temperature: float = 0.0) -> dict[str, Any]:
    event = load_event("direct-chat.json")
    return {**event, "max_tokens": max_tokens, "temperature": temperature}


@pytest.fixture
def function(tmp_path: Path) -> Iterator[Any]:
    """Start a runtime against a fresh Runtime API server: `start(runtime, **env)`."""
    started: list[tuple[RuntimeAPIServer, subprocess.Popen[bytes]]] = []

    def start(runtime: str, **env: str) -> tuple[RuntimeAPIServer, subprocess.Popen[bytes], Path]:
        server = RuntimeAPIServer().__enter__()
        log = tmp_path / f"{runtime}.log"
        run_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT),
            "MODEL_URI": str(model_path()),
            "N_CTX": "1024",
            "AWS_LAMBDA_RUNTIME_API": server.address,
            "AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start",
            "LOG_LEVEL": "info",
            **({"LD_PRELOAD": str(LAZY_MMAP)} if LAZY_MMAP.is_file() else {}),
            **env,
        }
        with log.open("wb") as out:
            proc = subprocess.Popen(
                RUNTIMES[runtime],
                env=run_env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append((server, proc))
        return server, proc, log

    yield start
    for server, proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        server.close()


def emf_lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"_aws"')]


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_snapshot_holds_a_warm_resident_model_and_the_restore_is_counted(function, runtime):
    server, proc, log = function(runtime)
    server.wait_snapshot()
    # At the snapshot point init is over: the model is loaded, warmed up and resident.
    before_snapshot = log.read_text()
    assert "ready to freeze" in before_snapshot, before_snapshot[-2000:]
    assert server.calls[-1][1] == "GET /restore/next"
    assert not any("/invocation/next" in call for _, call in server.calls)
    assert proc.poll() is None

    server.restore()
    ping = server.result(server.invoke(load_event("eventbridge-keep-warm.json"))).json()
    assert ping["ok"] is True and ping["state"] == "warm"
    assert ping["resident"]["percent"] >= 95
    answer = server.result(server.invoke(chat_event())).json()
    assert answer["choices"][0]["message"]["content"]

    records = emf_lines(log)
    first = records[0]
    assert first["ColdStart"] == 1.0 and first["Restore"] == 1.0
    assert "InitDuration" not in first  # init ran at publish time, not in this environment
    assert "RestoreDuration" in first
    assert all(r["ColdStart"] == 0.0 for r in records[1:])


def test_without_snap_start_there_is_no_restore_lifecycle(function):
    server, _, log = function("coldstart", AWS_LAMBDA_INITIALIZATION_TYPE="on-demand")
    answer = server.result(server.invoke(chat_event())).json()
    assert answer["choices"][0]["message"]["content"]
    assert not server.snapshot_requested
    assert "Restore" not in emf_lines(log)[0]


def llama_server_child(proc: subprocess.Popen[bytes]) -> int:
    """The pid of the llama-server child under the runtime process."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                if "llama-server" in Path(f"/proc/{pid}/cmdline").read_text():
                    return int(pid)
        time.sleep(0.1)
    raise TimeoutError("no llama-server child")


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_a_failing_after_restore_hook_is_reported_on_restore_error(function, runtime):
    binary = os.environ.get("COLDSTART_LLAMA_SERVER")
    if not binary or not Path(binary).is_file():
        pytest.skip("COLDSTART_LLAMA_SERVER not built (make test builds it)")
    server, proc, _ = function(
        runtime,
        INFERENCE_ENGINE="llama-server",
        LLAMA_SERVER_BIN=binary,
        PARALLEL_SLOTS="1",
        N_THREADS="1",
    )
    server.wait_snapshot()
    # The child server does not survive into the restored copy: the after-restore check sees it.
    os.kill(llama_server_child(proc), signal.SIGKILL)
    time.sleep(0.5)
    server.restore()
    error = server.wait_restore_error()
    assert "llama-server" in error.json()["errorMessage"]
    assert proc.wait(60) != 0


def test_two_restores_of_one_state_sample_differently(engine):
    app = LambdaApp(engine, make_settings())
    snapstart.before_freeze(app)
    assert engine.state is EngineState.WARM
    event = chat_event(max_tokens=24, temperature=1.5)
    snapshot = random.getstate()  # what every copy restored from one snapshot starts with

    answers = []
    for _ in range(2):
        random.setstate(snapshot)
        snapstart.after_restore(app)
        answers.append(app.invoke(event, FakeContext()))
    texts = [a["choices"][0]["message"]["content"] for a in answers]
    assert texts[0] != texts[1]
    assert answers[0]["id"] != answers[1]["id"]

    # Without the hook, every copy would draw the same seed for its first seedless request.
    random.setstate(snapshot)
    first = random.getrandbits(32)
    random.setstate(snapshot)
    assert random.getrandbits(32) == first


def test_restored_engine_adopts_the_cpus_it_now_has(engine, monkeypatch):
    import handler.engine.in_process.engine as in_process

    monkeypatch.setattr(in_process, "available_cpus", lambda: 1)
    engine.restored()  # N_THREADS unset: follow the machine the copy was restored on
    assert engine.threads == 1
    monkeypatch.undo()
    engine.restored()
    assert engine.threads == in_process.available_cpus()


def test_an_explicit_thread_count_survives_a_restore(monkeypatch):
    import handler.engine.in_process.engine as in_process

    pinned = InProcessEngine(make_settings(N_THREADS="1"))
    pinned.start()
    assert pinned.wait_loaded(60) is EngineState.READY
    monkeypatch.setattr(in_process, "available_cpus", lambda: 7)
    pinned.restored()
    assert pinned.threads == 1
