"""GIVEN the serving loop's lag monitor WHEN the loop is held up THEN /metrics shows the late
wake-ups as a Prometheus histogram, and a stall a probe would notice is logged."""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client.parser import text_string_to_metric_families

from handler.telemetry import Metrics
from handler.web.loop_lag import STALL_LOG_S, TICK_S, LoopLag


def histogram(metrics: Metrics) -> dict[str, float]:
    """The lag histogram's samples by bound (and _sum, _count), as prometheus_client reads it."""
    families = {f.name: f for f in text_string_to_metric_families(metrics.prometheus_text())}
    family = families["coldstart_event_loop_lag_seconds"]
    assert family.type == "histogram"
    return {s.labels.get("le", s.name.rsplit("_", 1)[-1]): s.value for s in family.samples}


def test_delays_land_in_their_buckets_cumulatively():
    lag = LoopLag()
    metrics = Metrics()
    metrics.watch("event_loop_lag_seconds", "how late", lag)
    for delay in (0.0002, 0.003, 0.003, 0.04, 2.0):
        lag.note(delay)
    found = histogram(metrics)
    assert found["0.001"] == 1
    assert found["0.0025"] == 1
    assert found["0.005"] == 3
    assert found["0.025"] == 3
    assert found["0.05"] == 4
    assert found["1.0"] == 4
    assert found["+Inf"] == 5
    assert found["count"] == 5
    assert abs(found["sum"] - 2.0462) < 1e-9


def test_a_loop_held_up_shows_a_late_wake_up():
    lag = LoopLag()
    metrics = Metrics()
    metrics.watch("event_loop_lag_seconds", "how late", lag)

    async def hold_the_loop() -> None:
        lag.start()
        lag.start()  # a second start watches nothing twice
        await asyncio.sleep(TICK_S * 3)  # a few punctual wake-ups first
        time.sleep(0.08)  # what a callback that hogs the loop does
        await asyncio.sleep(TICK_S * 3)

    asyncio.run(hold_the_loop())
    found = histogram(metrics)
    assert found["count"] >= 2
    # The tick due during the hold woke at least 0.08 - TICK_S late.
    assert found["+Inf"] - found["0.05"] >= 1


def test_a_stall_a_probe_would_notice_is_logged(caplog):
    lag = LoopLag()
    with caplog.at_level(logging.WARNING, logger="coldstart.api"):
        lag.note(STALL_LOG_S / 2)
        assert not caplog.records
        lag.note(STALL_LOG_S + 0.05)
    assert "event loop ran 300 ms late" in caplog.records[0].getMessage()


def test_each_wake_up_calls_the_hook_and_a_failing_hook_stops_nothing(caplog):
    calls: list[float] = []

    def hook() -> None:
        calls.append(time.perf_counter())
        if len(calls) == 2:
            raise RuntimeError("a bad hook")

    lag = LoopLag(on_wake=hook)
    metrics = Metrics()
    metrics.watch("event_loop_lag_seconds", "how late", lag)

    async def run_a_while() -> None:
        lag.start()
        await asyncio.sleep(TICK_S * 6)

    with caplog.at_level(logging.ERROR, logger="coldstart.api"):
        asyncio.run(run_a_while())
    assert len(calls) >= 3  # the wake-ups after the failing one still came
    assert histogram(metrics)["count"] == len(calls)
    assert "loop timer hook failed" in caplog.text
