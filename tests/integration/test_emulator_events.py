"""GIVEN the function under the real Lambda emulator WHEN each events/ sample is posted THEN the
response has the shape its source expects."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from tests.conftest import EVENTS_DIR, load_event
from tests.integration.servers import lambda_emulator

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def invoke_url():
    with lambda_emulator() as url:
        yield url


def invoke(url: str, event) -> dict:
    response = httpx.post(url, json=event, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def http_body(result: dict) -> str:
    body = result["body"]
    return base64.b64decode(body).decode() if result.get("isBase64Encoded") else body


def check_chat(result: dict) -> None:
    assert result["statusCode"] == 200
    assert result["headers"]["content-type"].startswith("application/json")
    body = json.loads(http_body(result))
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "name", ["function-url-chat.json", "apigw-v2-chat.json", "apigw-v1-chat.json", "alb-chat.json"]
)
def test_http_sources_return_a_chat_completion(invoke_url, name):
    result = invoke(invoke_url, load_event(name))
    check_chat(result)
    if name == "alb-chat.json":
        assert "statusDescription" in result or "multiValueHeaders" in result or result["headers"]


def test_function_url_stream_returns_sse_with_done(invoke_url):
    result = invoke(invoke_url, load_event("function-url-chat-stream.json"))
    assert result["statusCode"] == 200
    assert result["headers"]["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in http_body(result).split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


def test_function_url_models_and_base64_body(invoke_url):
    models = json.loads(http_body(invoke(invoke_url, load_event("function-url-models.json"))))
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
    completion = invoke(invoke_url, load_event("function-url-completion-base64.json"))
    assert json.loads(http_body(completion))["object"] == "text_completion"


KEEP_WARM_EVENTS = [
    "eventbridge-keep-warm.json",  # an EventBridge rule's scheduled event
    "scheduler-keep-warm.json",  # EventBridge Scheduler's default notification
    "scheduler-keep-warm-input.json",  # the Scheduler input template.yaml sends
]


@pytest.mark.parametrize("name", KEEP_WARM_EVENTS)
def test_keep_warm_ping_warms_a_fresh_function(name):
    """GIVEN a fresh function (WARMUP=lazy: loaded at init, not warm) WHEN a schedule's ping in
    one of its documented shapes is its first invoke THEN the ping warmed the model and reports
    it, with no HTTP shape."""
    with lambda_emulator() as url:
        result = invoke(url, load_event(name))
    assert result["ok"] is True, result
    assert result["state"] == "warm"
    assert "warmup_s" in result["phases_s"]
    assert result["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert "statusCode" not in result


def test_direct_invokes_return_openai_bodies(invoke_url):
    chat = invoke(invoke_url, load_event("direct-chat.json"))
    assert chat["object"] == "chat.completion"
    completion = invoke(invoke_url, load_event("direct-completion.json"))
    assert completion["object"] == "text_completion"
    embedding = invoke(invoke_url, load_event("direct-embedding.json"))
    assert embedding["object"] == "list" and len(embedding["data"]) == 2


def test_bad_direct_invoke_and_unknown_event_are_error_objects(invoke_url):
    bad = invoke(invoke_url, {"messages": [{"role": "wizard", "content": "x"}]})
    assert bad["error"]["type"] == "invalid_request_error"
    assert bad["error"]["param"].startswith("messages")
    unknown = invoke(invoke_url, {"hello": "world"})
    assert unknown["error"]["code"] == "unsupported_event"
    not_a_schedule = invoke(invoke_url, {"source": "aws.scheduler", "detail-type": "Other"})
    assert not_a_schedule["error"]["code"] == "unsupported_event"


def test_every_event_file_is_accepted(invoke_url):
    for path in sorted(EVENTS_DIR.glob("*.json")):
        result = invoke(invoke_url, json.loads(path.read_text()))
        assert result.get("error") is None, path.name  # a response object has "error": null
        assert result.get("statusCode", 200) == 200, path.name


def test_missing_model_is_a_one_line_init_error(tmp_path):
    missing = tmp_path / "absent.gguf"
    with lambda_emulator({"MODEL_URI": str(missing)}) as url:
        response = httpx.post(url, json=load_event("direct-chat.json"), timeout=60)
    body = response.json()
    assert "InitError" in body.get("errorType", "") or "Init" in json.dumps(body)
    assert str(missing) in body["errorMessage"]
    assert "file not found" in body["errorMessage"]
