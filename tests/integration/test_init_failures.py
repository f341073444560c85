"""GIVEN a model file that is missing, truncated or not GGUF WHEN the function starts under the real
Lambda emulator THEN init fails through the Runtime API with one line naming the path; WHEN the
HTTP server starts on it THEN /readyz says `failed` with the reason and /healthz still answers 200.

GIVEN a short function timeout under the real emulator WHEN a generation would outlast it THEN the
answer is a partial completion with finish_reason "length" and HTTP 200, not a timeout error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

from handler.aws_lambda.app import LambdaApp
from handler.engine import EngineState
from handler.engine.in_process.engine import InProcessEngine
from tests.conftest import FakeContext, load_event, make_settings, model_path
from tests.integration.servers import http_server, lambda_emulator, wait_until

pytestmark = pytest.mark.integration

RUNTIMES = {
    "awslambdaric": None,  # the default: python -m awslambdaric handler.lambda_function.handler
    "coldstart": [sys.executable, "-m", "handler", "runtime"],
}
# What each broken file must be called in the one-line reason.
EXPECTED = {
    "missing": "file not found",
    "truncated": "could not load it",
    "not-gguf": "not a GGUF file",
}


@pytest.fixture(params=sorted(EXPECTED))
def broken_model(request, tmp_path) -> tuple[Path, str]:
    """A model path that cannot load, and the phrase its error must contain."""
    path = tmp_path / f"{request.param}.gguf"
    if request.param == "truncated":
        with model_path().open("rb") as f:
            path.write_bytes(f.read(1 << 20))  # the header and part of the vocabulary
    elif request.param == "not-gguf":
        path.write_text(json.dumps(load_event("function-url-chat.json")))
    return path, EXPECTED[request.param]


def assert_one_line_naming(message: str, path: Path, phrase: str) -> None:
    assert "\n" not in message, message
    assert str(path) in message, message
    assert phrase in message, message


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_broken_model_is_an_init_error_through_the_runtime_api(broken_model, runtime):
    path, phrase = broken_model
    with lambda_emulator({"MODEL_URI": str(path)}, RUNTIMES[runtime]) as url:
        response = httpx.post(url, json=load_event("direct-chat.json"), timeout=60)

    # The emulator answers an invoke after a failed init with the error the runtime posted to
    # /runtime/init/error.
    assert response.status_code == 502, response.text
    error = response.json()
    assert error["errorType"].endswith("InitError"), error
    assert_one_line_naming(error["errorMessage"], path, phrase)


def test_broken_model_in_server_mode_fails_readiness_not_liveness(broken_model):
    path, phrase = broken_model
    with http_server({"MODEL_URI": str(path)}, ready=False) as base:
        wait_until(lambda: httpx.get(f"{base}/readyz").json()["state"] == "failed", 60)
        ready = httpx.get(f"{base}/readyz")
        health = httpx.get(f"{base}/healthz")
        chat = httpx.post(
            f"{base}/v1/chat/completions",
            json=json.loads(load_event("function-url-chat.json")["body"]),
        )

    assert ready.status_code == 503
    assert ready.headers["retry-after"]
    assert_one_line_naming(ready.json()["reason"], path, phrase)
    assert health.status_code == 200
    assert health.json()["state"] == "failed"
    assert chat.status_code == 503
    assert chat.json()["error"]["code"] == "model_not_ready"
    assert str(path) in chat.json()["error"]["message"]


def test_keep_warm_ping_reports_the_failure(broken_model):
    path, phrase = broken_model
    engine = InProcessEngine(make_settings(MODEL_URI=str(path)))
    engine.start()
    assert engine.wait_loaded(60) is EngineState.FAILED
    app = LambdaApp(engine, engine.settings)

    result = app(load_event("eventbridge-keep-warm.json"), FakeContext())

    assert result["ok"] is False
    assert result["state"] == "failed"
    assert_one_line_naming(result["reason"], path, phrase)
    assert "statusCode" not in result


# ------------------------------------------------------------------ deadline

TIMEOUT_S = 3
COUNTING = {
    "model": "SmolLM2-135M-Instruct.Q4_1",
    "prompt": "1, 2, 3, 4, 5, 6,",
    "max_tokens": 2000,
    "temperature": 0,
}
DEADLINE_ENV = {
    # The emulator takes the function timeout from here, as Lambda does from its configuration.
    "AWS_LAMBDA_FUNCTION_TIMEOUT": str(TIMEOUT_S),
    "N_CTX": "4096",  # 2000 tokens fit: only the deadline can cut the answer short
    "N_THREADS": "1",
}


def completion_event(stream: bool) -> dict:
    event = load_event("function-url-chat.json")
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/v1/completions"
    event["body"] = json.dumps({**COUNTING, "stream": stream})
    return event


def test_generation_past_the_function_timeout_returns_a_partial_completion():
    with lambda_emulator(DEADLINE_ENV) as url:
        # Init first (the emulator starts the runtime on the first invoke).
        httpx.post(url, json=load_event("eventbridge-keep-warm.json"), timeout=60)
        response = httpx.post(url, json=completion_event(stream=False), timeout=60)

    assert response.status_code == 200, response.text
    result = response.json()
    assert "errorType" not in result, result
    assert result["statusCode"] == 200, result
    body = json.loads(result["body"])
    assert body["choices"][0]["finish_reason"] == "length"
    assert 0 < body["usage"]["completion_tokens"] < COUNTING["max_tokens"]
    assert body["choices"][0]["text"].startswith(" 7")


def test_streamed_generation_past_the_function_timeout_ends_with_length_and_done():
    env = {**DEADLINE_ENV, "INVOKE_MODE": "RESPONSE_STREAM"}
    with lambda_emulator(env, [sys.executable, "-m", "handler", "lambda"]) as url:
        httpx.post(url, json=load_event("eventbridge-keep-warm.json"), timeout=60)
        response = httpx.post(url, json=completion_event(stream=True), timeout=60)

    assert response.status_code == 200, response.text
    prelude, _, body = response.content.partition(b"\0" * 8)
    assert json.loads(prelude)["statusCode"] == 200
    events = [e[6:] for e in body.decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text.startswith(" 7")
