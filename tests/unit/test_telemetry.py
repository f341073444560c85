"""GIVEN recorded metrics WHEN emitted
THEN EMF lines and Prometheus text parse as their specs say."""

from __future__ import annotations

import io
import json

import pytest

from handler.telemetry import METRICS, Metrics


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
