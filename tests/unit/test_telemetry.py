"""GIVEN recorded metrics WHEN emitted THEN EMF lines and Prometheus text parse as their specs
say; GIVEN log lines WHEN written in Lambda's JSON mode THEN each is one JSON object with the
request id of the invocation that wrote it."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from handler.config import ConfigError, load_settings
from handler.telemetry import (
    METRICS,
    JsonLogFormatter,
    Metrics,
    configure_logging,
    current_invocation,
    invocation_scope,
    log_fields,
)


def test_emf_line_declares_every_value_it_carries():
    metrics = Metrics(function_name="fn")
    metrics.record("ColdStart", 1)
    metrics.record("TimeToFirstToken", 0.25)
    metrics.record("TokensPerSecond", None)  # unknown values are skipped
    document = json.loads(metrics.emf_line())
    directive = document["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "coldstart"
    assert directive["Dimensions"] == [["FunctionName"]]
    names = {m["Name"]: m["Unit"] for m in directive["Metrics"]}
    assert names == {"ColdStart": "Count", "TimeToFirstToken": "Seconds"}
    assert document["FunctionName"] == "fn"
    assert document["TimeToFirstToken"] == 0.25
    assert isinstance(document["_aws"]["Timestamp"], int)


def test_emf_flush_writes_once_then_nothing():
    metrics = Metrics()
    metrics.record("LoadDuration", 0.1)
    out = io.StringIO()
    metrics.flush_emf(out)
    metrics.flush_emf(out)
    assert len(out.getvalue().splitlines()) == 1


def test_unknown_metric_is_an_error():
    with pytest.raises(KeyError):
        Metrics().record("Nope", 1)


def test_prometheus_text_parses():
    from prometheus_client.parser import text_string_to_metric_families

    metrics = Metrics()
    metrics.record("CompletionTokens", 5)
    metrics.record("CompletionTokens", 7)
    text = metrics.prometheus_text({"queue_depth": 2})
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {s.name: s.value for f in families.values() for s in f.samples}
    assert samples["coldstart_completion_tokens_sum"] == 12
    assert samples["coldstart_completion_tokens_count"] == 2
    assert samples["coldstart_completion_tokens_last"] == 7
    assert samples["coldstart_queue_depth"] == 2


def test_every_metric_has_a_unit_and_help():
    for unit, help_text in METRICS.values():
        assert unit and help_text


# ------------------------------------------------------------------------ logging


@pytest.fixture
def json_logs() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """JSON log mode, and a logger of ours whose lines go through JsonLogFormatter into a buffer;
    text mode again afterwards (the mode is process-wide, like the root logger)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("coldstart.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    configure_logging("INFO", "JSON")
    try:
        yield logger, out
    finally:
        configure_logging("INFO", "Text")
        logger.removeHandler(handler)
        logger.propagate = True


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_line_carries_the_lambda_keys_the_request_id_and_our_fields(json_logs):
    """GIVEN JSON mode WHEN an invoke line is logged inside an invocation THEN it is one JSON
    object: timestamp, level, logger, the bare message, requestId, and each field as a key."""
    logger, out = json_logs
    with invocation_scope("req-1"):
        log_fields(logger, "invoke", kind="function_url", cold=True, duration_ms=12.5)
    (line,) = lines(out)
    assert line["message"] == "invoke"
    assert line["level"] == "INFO"
    assert line["logger"] == "coldstart.test-json"
    assert line["requestId"] == "req-1"
    assert (line["kind"], line["cold"], line["duration_ms"]) == ("function_url", True, 12.5)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["timestamp"])


def test_text_mode_puts_the_fields_after_the_message(caplog):
    """GIVEN text mode (the default) WHEN an invoke line is logged THEN its message reads
    `invoke key=value ...` and the fields are on the record too."""
    configure_logging("INFO", "Text")
    caplog.set_level(logging.INFO, logger="coldstart.test-text")
    log_fields(logging.getLogger("coldstart.test-text"), "invoke", kind="direct", cold=False)
    (record,) = caplog.records
    assert record.getMessage() == "invoke kind=direct cold=False"
    assert record.__dict__["kind"] == "direct"


def test_an_exception_becomes_error_keys_on_one_line(json_logs):
    """GIVEN JSON mode WHEN an exception is logged THEN the traceback is a key of the same
    object (CloudWatch keeps one event), never lines of its own."""
    logger, out = json_logs
    try:
        raise ValueError("bad value")
    except ValueError:
        logger.exception("direct invoke failed")
    assert len(out.getvalue().splitlines()) == 1
    (line,) = lines(out)
    assert (line["errorType"], line["errorMessage"]) == ("ValueError", "bad value")
    assert line["stackTrace"] and "requestId" not in line  # outside any invocation


def test_concurrent_invocations_each_log_their_own_request_id(json_logs):
    """GIVEN two invocations in flight on two threads (our loop's concurrency) WHEN each logs
    THEN each line has its own thread's request id, and a line from a thread that serves
    neither (the engine's) has none rather than a wrong one."""
    logger, out = json_logs
    both_in = threading.Barrier(3)
    done = threading.Barrier(3)

    def serve(request_id: str) -> None:
        with invocation_scope(request_id):
            both_in.wait()
            log_fields(logger, "invoke", kind="direct")
            done.wait()

    threads = [threading.Thread(target=serve, args=(f"req-{i}",)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    both_in.wait()
    logger.info("engine line")  # this thread serves no invocation; two are in flight
    done.wait()
    for thread in threads:
        thread.join()
    by_message = {}
    for line in lines(out):
        by_message.setdefault(line["message"], []).append(line.get("requestId"))
    assert sorted(by_message["invoke"]) == ["req-1", "req-2"]
    assert by_message["engine line"] == [None]


def test_a_thread_outside_the_invocation_gets_the_one_in_flight(json_logs):
    """GIVEN one invocation in flight WHEN another thread (the engine's, a request pool's)
    logs THEN its line carries that invocation's request id, as awslambdaric's would."""
    logger, out = json_logs
    with invocation_scope("req-only"):
        worker = threading.Thread(target=logger.info, args=("model warm",))
        worker.start()
        worker.join()
    assert lines(out)[0]["requestId"] == "req-only"


def test_metrics_recorded_during_an_invocation_count_towards_it():
    """GIVEN an invocation in scope WHEN the service records token metrics THEN the invocation
    has their totals (its log line reports them); outside any scope nothing is kept."""
    metrics = Metrics()
    with invocation_scope("req-tokens") as invocation:
        metrics.record("PromptTokens", 5)
        metrics.record("CompletionTokens", 3)
        metrics.record("CompletionTokens", 4)
        with invocation_scope("req-tokens") as again:  # our loop and the app both enter it
            assert again is invocation
    assert invocation.totals == {"PromptTokens": 5, "CompletionTokens": 7}
    assert current_invocation() is None


@pytest.mark.parametrize(
    ("env", "level", "log_format"),
    [
        ({}, "INFO", "Text"),
        ({"LOG_LEVEL": "debug"}, "DEBUG", "Text"),
        ({"AWS_LAMBDA_LOG_FORMAT": "JSON", "AWS_LAMBDA_LOG_LEVEL": "WARN"}, "WARNING", "JSON"),
        ({"LOG_LEVEL": "debug", "AWS_LAMBDA_LOG_LEVEL": "ERROR"}, "ERROR", "Text"),
        ({"AWS_LAMBDA_LOG_LEVEL": "trace"}, "DEBUG", "Text"),
        ({"AWS_LAMBDA_LOG_LEVEL": "FATAL"}, "CRITICAL", "Text"),
        ({"AWS_LAMBDA_LOG_FORMAT": "json"}, "INFO", "JSON"),
        ({"AWS_LAMBDA_LOG_FORMAT": "Text"}, "INFO", "Text"),
    ],
)
def test_lambda_log_settings(env, level, log_format):
    """GIVEN the variables Lambda sets from LoggingConfig WHEN settings load THEN Lambda's
    application log level replaces LOG_LEVEL and JSON is recognised in any case."""
    settings = load_settings(env)
    assert settings.logging_level == level
    assert settings.aws_lambda_log_format == log_format


def test_an_unknown_lambda_log_level_names_the_variable():
    with pytest.raises(ConfigError, match="AWS_LAMBDA_LOG_LEVEL"):
        load_settings({"AWS_LAMBDA_LOG_LEVEL": "LOUD"})
