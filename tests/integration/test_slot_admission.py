"""GIVEN our HTTP server on INFERENCE_ENGINE=llama-server (the real CPU llama-server, 2 slots,
MAX_QUEUE 2) WHEN more requests arrive than it admits THEN the ones past MAX_CONCURRENCY +
MAX_QUEUE get 429 with Retry-After while the admitted ones are served, /readyz and /metrics show
the two that wait for a slot, and liveness and readiness answer while every slot generates.
(Their latency under load is a figure of bench.p6_gpu, not an assertion here.)"""

from __future__ import annotations

from contextlib import ExitStack

import httpx
import pytest

from tests.integration.servers import http_server, wait_until
from tests.integration.test_slot_engine import server_bin

pytestmark = pytest.mark.integration

SLOTS, QUEUE = 2, 2
COUNTING = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 1000, "temperature": 0}


def slot_env() -> dict[str, str]:
    return {
        "INFERENCE_ENGINE": "llama-server",
        "LLAMA_SERVER_BIN": server_bin(),
        "PARALLEL_SLOTS": str(SLOTS),
        "MAX_QUEUE": str(QUEUE),
        "N_THREADS": "2",
    }


def gauge(metrics: str, name: str) -> float:
    """A gauge's value from Prometheus text."""
    line = next(line for line in metrics.splitlines() if line.startswith(f"{name} "))
    return float(line.split()[1])


def first_token(response: httpx.Response) -> str:
    """The first SSE line that carries generated text."""
    return next(line for line in response.iter_lines() if '"text":"' in line)


def test_past_capacity_429_at_once_while_the_admitted_are_served_and_the_queue_is_seen():
    with (
        http_server(slot_env()) as base,
        httpx.Client(timeout=120) as client,
        ExitStack() as open_streams,
    ):
        streamed = {**COUNTING, "stream": True}
        # Response headers come as soon as a request is admitted and handed to llama-server.
        admitted = [
            open_streams.enter_context(
                client.stream("POST", base + "/v1/completions", json=streamed)
            )
            for _ in range(SLOTS + QUEUE)
        ]
        assert [r.status_code for r in admitted] == [200] * (SLOTS + QUEUE)

        def queue_depth() -> float:
            return float(client.get(base + "/readyz").json()["queue_depth"])

        wait_until(lambda: queue_depth() == QUEUE, 30)
        assert gauge(client.get(base + "/metrics").text, "coldstart_queue_depth") == QUEUE

        for body in (COUNTING, streamed):
            refused = client.post(base + "/v1/completions", json=body)
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["type"] == "rate_limit_error"

        live = client.get(base + "/healthz")
        ready = client.get(base + "/readyz")
        assert live.status_code == 200 and ready.status_code == 200
        assert ready.json()["state"] in ("ready", "warm")

        for response in admitted[:SLOTS]:  # the two on slots generate now
            assert first_token(response)
            response.close()
        for response in admitted[SLOTS:]:  # the two that waited get the freed slots
            assert first_token(response)
            response.close()

        short = {**COUNTING, "max_tokens": 2}
        wait_until(lambda: client.post(base + "/v1/completions", json=short).status_code == 200, 30)
        wait_until(lambda: queue_depth() == 0, 30)
