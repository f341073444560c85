"""GIVEN server-mode limits WHEN they are exceeded THEN the answer is a clear 429/503, a client that
hangs up stops its generation, and CONTEXT_OVERFLOW=truncate keeps the system message."""

from __future__ import annotations

import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from handler.engine.in_process.engine import InProcessEngine
from handler.model_source import resolve_model
from handler.service.openai_service import OpenAIService
from handler.service.schemas import ChatCompletionRequest
from handler.service.shapes import CHAT
from tests.conftest import http_app, make_settings
from tests.integration.servers import http_server, wait_until

pytestmark = pytest.mark.integration

COUNTING = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 1000, "temperature": 0}


def test_requests_beyond_concurrency_and_queue_get_429_with_retry_after():
    with (
        http_server({"MAX_CONCURRENCY": "1", "MAX_QUEUE": "0"}) as base,
        httpx.Client(timeout=120) as client,
    ):
        streaming = client.stream(
            "POST", base + "/v1/completions", json={**COUNTING, "stream": True}
        )
        with streaming as first:
            # Keep the iterator: a dropped one closes the connection, and the server, seeing the
            # client go, frees the slot at once.
            lines = first.iter_lines()
            next(lines)  # the first request is now generating
            second = client.post(base + "/v1/completions", json=COUNTING)
            assert second.status_code == 429
            assert int(second.headers["retry-after"]) >= 1
            assert second.json()["error"]["type"] == "rate_limit_error"
        # Once the server sees the first client go, its slot is released.
        short = {**COUNTING, "max_tokens": 2}
        wait_until(lambda: client.post(base + "/v1/completions", json=short).status_code == 200, 30)


def tokens_of_the_one_finished_request(base: str) -> float:
    """Once the server has finished one request (/metrics counts it), its completion tokens."""

    def one_request_finished() -> bool:
        return "coldstart_completion_tokens_count 1" in httpx.get(base + "/metrics").text

    wait_until(one_request_finished, 60)
    text = httpx.get(base + "/metrics").text
    last = next(
        line for line in text.splitlines() if line.startswith("coldstart_completion_tokens_last ")
    )
    return float(last.split()[1])


def test_client_disconnect_stops_a_buffered_generation():
    with http_server() as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", json=COUNTING, timeout=0.5)

        assert tokens_of_the_one_finished_request(base) < 1000


def test_client_disconnect_stops_a_streamed_generation():
    """GIVEN a stream under way WHEN its client hangs up THEN the generation stops there, long
    before its 1,000 tokens."""
    with http_server() as base, httpx.Client(timeout=120) as client:
        with client.stream(
            "POST", base + "/v1/completions", json={**COUNTING, "stream": True}
        ) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # generating
        # Leaving the block closed the connection mid-stream.
        assert tokens_of_the_one_finished_request(base) < 1000


def test_server_mode_answers_503_at_once_while_loading_then_200():
    settings = make_settings()
    release = threading.Event()

    def slow_resolver(s, progress):
        release.wait(30)
        return resolve_model(s, progress)

    engine = InProcessEngine(settings, resolver=slow_resolver)
    engine.start()
    client = TestClient(http_app(engine, settings))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    loading = client.post("/v1/chat/completions", json=body)
    assert loading.status_code == 503
    assert loading.headers["retry-after"]
    assert loading.json()["error"]["code"] == "model_not_ready"
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["state"] == "loading"
    assert client.get("/healthz").status_code == 200
    release.set()
    engine.wait_loaded(60)
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert client.get("/readyz").status_code == 200


def long_chat(system: str) -> ChatCompletionRequest:
    turns = []
    for i in range(40):
        turns.append({"role": "user", "content": f"Question {i}: " + "tell me more " * 12})
        turns.append({"role": "assistant", "content": "Here is more. " * 10})
    return ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "system", "content": system},
                *turns,
                {"role": "user", "content": "Last question: what is 2+2?"},
            ],
            "max_tokens": 8,
            "temperature": 0,
        }
    )


def test_truncation_drops_old_turns_but_keeps_system_and_last_message(engine):
    from handler.errors import ContextLengthExceeded

    request = long_chat("You are terse. SYSTEM-MARKER")
    strict = OpenAIService(engine, make_settings())
    with pytest.raises(ContextLengthExceeded):
        strict.complete(CHAT, request, None)
    sliding = OpenAIService(engine, make_settings(CONTEXT_OVERFLOW="truncate"))
    prompt = CHAT.prompt(request, engine, sliding.settings, CHAT.check(request, sliding.settings))
    rendered = "".join(
        engine._model_handle.piece(t, special=True).decode(errors="ignore") for t in prompt.tokens
    )
    assert "SYSTEM-MARKER" in rendered
    assert "Last question: what is 2+2?" in rendered
    assert "Question 0:" not in rendered  # the oldest turn went first
    assert len(prompt.tokens) + 8 <= engine.settings.n_ctx
    result = sliding.complete(CHAT, request, None)
    assert result["choices"][0]["message"]["content"]
