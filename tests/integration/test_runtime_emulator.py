"""GIVEN our Runtime API loop under the real Lambda emulator (`python -m handler lambda` picks it
for INVOKE_MODE=RESPONSE_STREAM) WHEN events/ samples are posted THEN every invocation completes:
function URL requests as a streamed HTTP integration response (the emulator accepts the stream
and hands it over whole), everything else as one JSON body."""

from __future__ import annotations

import json
import sys

import httpx
import pytest

from tests.conftest import load_event
from tests.integration.servers import lambda_emulator

pytestmark = pytest.mark.integration

DELIMITER = b"\0" * 8
LAMBDA_CMD = [sys.executable, "-m", "handler", "lambda"]


@pytest.fixture(scope="module")
def streaming_url():
    with lambda_emulator({"INVOKE_MODE": "RESPONSE_STREAM"}, LAMBDA_CMD) as url:
        yield url


def invoke(url: str, name: str) -> bytes:
    response = httpx.post(url, json=load_event(name), timeout=120)
    assert response.status_code == 200, response.text
    return response.content


def split_prelude(raw: bytes) -> tuple[dict, bytes]:
    head, sep, body = raw.partition(DELIMITER)
    assert sep, f"no prelude in {raw[:200]!r}"
    return json.loads(head), body


def test_streamed_function_url_request_returns_the_full_sse(streaming_url):
    prelude, body = split_prelude(invoke(streaming_url, "function-url-chat-stream.json"))

    assert prelude["statusCode"] == 200
    assert prelude["headers"]["content-type"].startswith("text/event-stream")
    events = [e[6:] for e in body.decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip()
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


def test_non_stream_function_url_request_is_one_json_body_after_the_prelude(streaming_url):
    prelude, body = split_prelude(invoke(streaming_url, "function-url-chat.json"))

    assert prelude["statusCode"] == 200
    assert prelude["headers"]["content-type"] == "application/json"
    assert json.loads(body)["choices"][0]["message"]["content"]


def test_unknown_route_keeps_the_apps_error_object(streaming_url):
    event = load_event("function-url-models.json")
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/v1/nope"
    response = httpx.post(streaming_url, json=event, timeout=120)
    prelude, body = split_prelude(response.content)

    assert prelude["statusCode"] == 404
    assert json.loads(body)["error"]["type"]


@pytest.mark.parametrize("name", ["direct-chat.json", "eventbridge-keep-warm.json"])
def test_other_events_get_a_buffered_json_body(streaming_url, name):
    result = json.loads(invoke(streaming_url, name))

    if name == "direct-chat.json":
        assert result["object"] == "chat.completion"
    else:
        assert result["ok"] is True and result["state"] == "warm"


def test_default_config_still_runs_awslambdaric_buffered():
    with lambda_emulator(None, LAMBDA_CMD) as url:
        result = json.loads(invoke(url, "function-url-chat.json"))

    assert result["statusCode"] == 200
    assert json.loads(result["body"])["object"] == "chat.completion"
