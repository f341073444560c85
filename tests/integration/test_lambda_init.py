"""GIVEN Lambda init WHEN the load outlasts INIT_BUDGET_S THEN init returns and the first request
waits for the model within its own remaining time."""

from __future__ import annotations

import time

import pytest

from handler.aws_lambda.init import InitError, init
from handler.engine import EngineState
from tests.conftest import FakeContext, load_event, make_settings

pytestmark = pytest.mark.integration


def test_init_within_budget_then_first_request_waits_for_the_load():
    started = time.perf_counter()
    app = init(started, make_settings(INIT_BUDGET_S="0.001"))
    assert time.perf_counter() - started < 5
    # The import of llama_cpp alone takes longer than 1 ms, so the load is still running.
    assert app.engine.state in (EngineState.LOADING, EngineState.READY)
    result = app(load_event("direct-chat.json"), FakeContext(remaining_ms=60_000))
    assert result["object"] == "chat.completion"


def test_first_request_gets_503_when_its_time_runs_out_before_the_load():
    app = init(time.perf_counter(), make_settings(INIT_BUDGET_S="0.001"))
    if app.engine.state is not EngineState.LOADING:
        pytest.skip("load finished before the first request could race it")
    result = app(load_event("function-url-chat.json"), FakeContext(remaining_ms=1))
    assert result["statusCode"] == 503
    assert result["headers"]["retry-after"]


def test_failed_load_within_budget_is_an_init_error(tmp_path):
    with pytest.raises(InitError) as info:
        init(time.perf_counter(), make_settings(MODEL_URI=str(tmp_path / "nope.gguf")))
    assert "nope.gguf" in str(info.value)


def test_deadline_gives_partial_completion_with_length():
    app = init(time.perf_counter(), make_settings())
    event = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 900, "temperature": 0}
    result = app(event, FakeContext(remaining_ms=1200))
    choice = result["choices"][0]
    assert choice["finish_reason"] == "length"
    assert 0 < result["usage"]["completion_tokens"] < 900


def test_each_invoke_writes_one_emf_line_with_cold_start_once(capsys):
    import json

    app = init(time.perf_counter(), make_settings())
    capsys.readouterr()
    app(load_event("direct-completion.json"), FakeContext())
    app(load_event("direct-completion.json"), FakeContext())
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 2
    first, second = lines
    assert first["ColdStart"] == 1 and second["ColdStart"] == 0
    assert first["InitDuration"] > 0 and "InitDuration" not in second
    assert first["LoadDuration"] > 0 and "LoadDuration" not in second
    assert second["CompletionTokens"] >= 1 and second["TimeToFirstToken"] > 0
    declared = {m["Name"] for m in first["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert {"ColdStart", "InitDuration", "LoadDuration", "TimeToFirstToken"} <= declared
