"""GIVEN the function under the real Lambda emulator with Lambda's JSON log format
(AWS_LAMBDA_LOG_FORMAT=JSON, as `LogFormat: JSON` sets it), under awslambdaric and under our
Runtime API loop, WHEN events are invoked THEN every line the function writes is one JSON object,
every line written while an invocation runs carries that invocation's request id, the invoke line
carries our fields as keys, and no line holds a prompt or a completion."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.common import AWSLAMBDARIC, emulator_command, free_port, invoke_url, spawn
from tests.conftest import load_event, model_path
from tests.integration.servers import wait_until

pytestmark = pytest.mark.integration

RUNTIMES = {
    "awslambdaric": AWSLAMBDARIC,
    "coldstart": [sys.executable, "-m", "handler", "runtime"],
}
# The function's last line for an invocation: awslambdaric's is our invoke line; our loop logs
# its own line after it has posted the response.
LAST_LOGGER = {"awslambdaric": "coldstart.lambda", "coldstart": "coldstart.runtime"}
# The first invoke only starts the function (init, then /v1/models: no generation); the lines
# of the invokes after it are the ones checked for their request id.
FIRST = "function-url-models.json"
CHECKED = ["scheduler-keep-warm.json", "function-url-chat.json", "direct-chat.json"]
PROMPT = "Name the capital of France in one word."
# What the emulator itself prints (its own log lines and START/END/REPORT), not the function.
EMULATOR_LINE = re.compile(r"^(\d\d \w{3} \d{4} \d\d:\d\d:\d\d,\d{3} \[\w+\] |(START|END|REPORT) )")
EMULATOR_START = re.compile(r"^START RequestId: (\S+)")


@contextmanager
def emulated(runtime: str, log: Path) -> Iterator[str]:
    """The emulator running `runtime` in JSON log mode, everything it prints into `log`."""
    port, api_port = free_port(), free_port()
    env = {
        "MODEL_URI": str(model_path()),
        "N_CTX": "1024",
        "API_KEY": "",  # empty = unset
        "AWS_LAMBDA_LOG_FORMAT": "JSON",
        "AWS_LAMBDA_LOG_LEVEL": "INFO",
    }
    command = emulator_command(port, api_port, RUNTIMES[runtime])
    with log.open("wb") as out, spawn(command, env, log=out, grace_s=10) as proc:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=1) is not None, 30, proc)
        yield invoke_url(port)


def invoke(url: str, name: str) -> Any:
    response = httpx.post(url, json=load_event(name), timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def parse(log: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every line the function wrote, decoded (fails on the first that is not a JSON object), and
    the request ids the emulator started, in order."""
    decoded, started = [], []
    for line in log.read_text().splitlines():
        if start := EMULATOR_START.match(line):
            started.append(start.group(1))
        if not line.strip() or EMULATOR_LINE.match(line):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(value, dict), line
        decoded.append(value)
    return decoded, started


@dataclass
class Run:
    """One emulator run: its runtime, the function's decoded lines, the answers to the events."""

    runtime: str
    lines: list[dict[str, Any]]
    request_ids: list[str]  # as the emulator started them
    answers: list[Any]

    @property
    def logs(self) -> list[dict[str, Any]]:
        """The log lines, EMF lines left out (they stay EMF, written by the metrics)."""
        return [line for line in self.lines if "_aws" not in line]

    @property
    def invokes(self) -> list[dict[str, Any]]:
        """The app's one line per invocation."""
        return [line for line in self.logs if line["message"] == "invoke"]


@pytest.fixture(scope="module", params=sorted(RUNTIMES))
def run(request, tmp_path_factory) -> Run:
    """FIRST then CHECKED invoked on a fresh function under the runtime."""
    runtime = request.param
    log = tmp_path_factory.mktemp(f"logs-{runtime}") / "emulator.log"
    with emulated(runtime, log) as url:
        answers = [invoke(url, name) for name in [FIRST, *CHECKED]]
    lines, request_ids = parse(log)
    return Run(runtime, lines, request_ids, answers)


def test_every_line_is_a_json_object_with_the_lambda_keys(run):
    assert run.answers[1]["state"] == "warm"  # the Scheduler ping warmed the model
    assert len(run.logs) > len(CHECKED), run.lines
    for line in run.logs:
        assert {"timestamp", "level", "message", "logger"} <= set(line), line


def test_lines_of_each_invocation_carry_its_request_id(run):
    request_ids = [line["requestId"] for line in run.invokes]
    assert request_ids == run.request_ids  # one invoke line each, with the emulator's id
    assert len(set(request_ids)) == 1 + len(CHECKED), request_ids
    first_done = next(
        i
        for i, line in enumerate(run.logs)
        if line["logger"] == LAST_LOGGER[run.runtime] and line.get("requestId") == request_ids[0]
    )
    later = run.logs[first_done + 1 :]
    assert later, "no lines after the first invocation"
    for line in later:
        assert line.get("requestId") in request_ids[1:], line
    warm = [line for line in later if line["message"].startswith("model warm")]
    assert [line["requestId"] for line in warm] == [request_ids[1]]  # the engine thread's line


def test_invoke_line_has_our_fields_as_keys(run):
    invokes = run.invokes
    assert [line["kind"] for line in invokes] == [
        "function_url",
        "keep_warm",
        "function_url",
        "direct",
    ]
    assert [line["cold"] for line in invokes] == [True, False, False, False]
    assert all(line["state"] == "warm" for line in invokes[1:])  # the ping warmed it
    assert all(isinstance(line["duration_ms"], float) for line in invokes)
    chat = invokes[2]
    assert chat["prompt_tokens"] > 0 and chat["completion_tokens"] > 0
    assert "prompt_tokens" not in invokes[1]  # a ping generates nothing


def test_no_line_holds_a_prompt_or_a_completion(run):
    text = "\n".join(json.dumps(line) for line in run.lines)
    assert PROMPT not in text
    completion = run.answers[3]["choices"][0]["message"]["content"]
    assert completion.strip() and completion not in text
