"""GIVEN the HTTP server on the real model WHEN the official openai client calls it
THEN it works."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.integration.servers import http_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base_url():
    with http_server() as base:
        yield base


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name the capital of France in one word."},
]


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert client.models.retrieve("SmolLM2-135M-Instruct.Q4_1").id == "SmolLM2-135M-Instruct.Q4_1"


def test_chat_completion(client):
    completion = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", messages=MESSAGES, max_tokens=16, temperature=0
    )
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens >= 1
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_stream_with_include_usage_matches_buffered_text(client):
    kwargs = {"model": "m", "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    buffered = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == buffered
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_stop_sequence_and_length_finish(client):
    completion = client.completions.create(
        model="m", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"]
    )
    assert completion.choices[0].finish_reason == "stop"
    assert " 7" not in completion.choices[0].text
    short = client.completions.create(
        model="m", prompt="Once upon a time", max_tokens=3, temperature=0
    )
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3


def test_completion_stream(client):
    chunks = list(
        client.completions.create(
            model="m", prompt="The sky is", max_tokens=5, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks).strip()
    assert chunks[-1].choices[0].finish_reason == "length"


def test_embeddings_float_and_base64(client):
    result = client.embeddings.create(model="m", input=["cold start", "warm start"])
    assert len(result.data) == 2
    vector = result.data[0].embedding
    assert len(vector) > 100
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-3  # normalised
    as_float = client.embeddings.create(model="m", input="cold start", encoding_format="float")
    assert as_float.data[0].embedding == pytest.approx(vector, abs=1e-5)


def test_client_raises_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[], max_tokens=4)
    assert info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "word " * 2000}], max_tokens=4
        )
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_health_and_readiness(base_url):
    assert httpx.get(base_url + "/healthz").json()["status"] == "ok"
    ready = httpx.get(base_url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["state"] in ("ready", "warm")


def test_metrics_endpoint_is_prometheus_text(base_url, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model="m", prompt="Hello", max_tokens=2)
    text = httpx.get(base_url + "/metrics").text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["coldstart_completion_tokens_count"] >= 1
    assert samples["coldstart_time_to_first_token_last"] > 0
    assert samples["coldstart_phase_load_s"] > 0
    assert sum(v for k, v in samples.items() if k.startswith("coldstart_state_")) == 1


def test_metrics_show_how_late_the_serving_loop_woke(base_url):
    """The serving loop's lag histogram counts wake-ups from the first request on."""
    from prometheus_client.parser import text_string_to_metric_families

    def lag_count() -> float:
        text = httpx.get(base_url + "/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        family = families["coldstart_event_loop_lag_seconds"]
        assert family.type == "histogram"
        return next(s.value for s in family.samples if s.name.endswith("_count"))

    first = lag_count()
    deadline = time.monotonic() + 30
    while lag_count() <= first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lag_count() > first
