"""GIVEN the load-test events and runner WHEN the generator writes events and the runner sends a
handful of them to the HTTP server and to the Lambda emulator THEN the events are deterministic
and the report carries QPS, latency percentiles, TTFT, errors by kind and RSS."""

from __future__ import annotations

import json

import pytest

from bench import load, load_events
from tests.conftest import EVENTS_DIR

pytestmark = pytest.mark.integration

ONE_THREAD = ["--env", "N_THREADS=1"]  # a busy 2-core machine; this checks the report, not speed


def test_generator_is_deterministic_and_covers_sizes_and_streaming(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    (first / "stale.json").parent.mkdir()
    (first / "stale.json").write_text("{}")
    for out in (first, second):
        load_events.main(["--count", "6", "--stream-ratio", "0.5", "--out", str(out)])

    names = sorted(p.name for p in first.glob("*.json"))
    assert names == sorted(p.name for p in second.glob("*.json"))
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)
    assert "stale.json" not in names
    kinds = {tuple(n.removesuffix(".json").split("-")[1:]) for n in names}
    assert kinds == {(s, m) for s in ("small", "medium", "long") for m in ("stream", "buffered")}
    for name in names:
        event = json.loads((first / name).read_text())
        body = json.loads(event["body"])
        assert event["rawPath"] == "/v1/chat/completions"
        assert body.get("stream", False) == ("stream" in name)


def test_committed_load_events_are_what_the_generator_writes(tmp_path):
    load_events.main(["--out", str(tmp_path)])
    committed = {p.name: p.read_bytes() for p in (EVENTS_DIR / "load").glob("*.json")}
    generated = {p.name: p.read_bytes() for p in tmp_path.glob("*.json")}
    assert committed == generated, "regenerate with: python -m bench.load_events"


def check_report(report: dict, requests: int) -> None:
    assert report["requests"] == requests
    assert report["ok"] + sum(report["errors"].values()) == requests
    assert report["error_rate"] == 0.0, report["errors"]
    assert report["qps"] > 0 and report["duration_s"] > 0
    assert set(report["latency_s"]) == {"p50", "p95", "p99", "mean", "max"}
    assert report["latency_s"]["p50"] <= report["latency_s"]["p95"] <= report["latency_s"]["p99"]
    assert report["completion_tokens"] > 0
    assert set(report["by_size"]) == {"small", "medium", "long"}
    assert report["rss_mb"]["start"] > 0 and report["rss_mb"]["end"] > 0


def test_runner_against_the_server_reports_latency_ttft_and_errors(tmp_path):
    out = tmp_path / "server.json"
    args = ["--target", "server", "--requests", "4", "--concurrency", "2", "--warmup", "0"]
    assert load.main([*args, *ONE_THREAD, "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    check_report(report, 4)
    assert report["target"] == "server" and report["concurrency"] == 2
    assert report["streamed"] == 2
    assert set(report["ttft_s"]) == {"p50", "p95", "p99", "mean", "max"}
    assert report["ttft_s"]["p50"] <= report["latency_s"]["max"]


def test_runner_against_the_emulator_reports_without_ttft(tmp_path):
    out = tmp_path / "emulator.json"
    args = ["--target", "emulator", "--requests", "3", "--warmup", "1"]
    assert load.main([*args, *ONE_THREAD, "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    check_report(report, 3)
    assert report["target"] == "emulator" and report["concurrency"] == 1
    assert report["ttft_s"] is None  # the emulator hands a stream over whole


def test_runner_counts_overload_as_an_error_kind(tmp_path):
    out = tmp_path / "overload.json"
    args = ["--target", "server", "--requests", "6", "--concurrency", "6", "--warmup", "0"]
    env = ["--env", "MAX_QUEUE=0"]  # one request runs, the rest are turned away
    assert load.main([*args, *ONE_THREAD, *env, "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    assert report["requests"] == 6
    assert report["errors"].get("http_429:overloaded", 0) >= 1
    assert report["ok"] + sum(report["errors"].values()) == 6
    assert 0 < report["error_rate"] < 1


def test_soak_flatness_is_measured_against_the_rss_after_warm_up():
    from bench.soak import flatness

    flat = flatness([(100, 200.0), (120, 204.0), (140, 199.0)], 200.0, 0.05)
    assert flat["flat"] and flat["max_deviation"] == 0.02
    growing = flatness([(100, 200.0), (500, 215.0), (900, 230.0)], 200.0, 0.05)
    assert not growing["flat"] and growing["slope_mb_per_100_requests"] > 0
