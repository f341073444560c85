"""GIVEN the cold lane and the FastAPI app on one engine WHEN the same requests reach both
THEN status, error objects and (at temperature 0) answers are the same."""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import pytest

from handler.api import create_app
from handler.cold_lane import ColdLane
from handler.openai_service import OpenAIService
from tests.conftest import make_settings

pytestmark = pytest.mark.integration

USER = [{"role": "user", "content": "Name the capital of France."}]
CASES = [
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 6, "temperature": 0}),
    ("/v1/completions", {"prompt": "The sky is", "max_tokens": 5, "temperature": 0}),
    ("/v1/completions", {"prompt": "1, 2, 3,", "max_tokens": 12, "temperature": 0, "stop": [" 6"]}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": -1}),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 10**9}),
    ("/v1/chat/completions", {"messages": USER, "n": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w " * 3000}]}),
    ("/v1/completions", {"prompt": ["a", "b"]}),
    ("/v1/completions", {}),
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", b"[1, 2]"),
    ("/v1/chat/completions", b""),
]


def lanes(engine, **settings_env):
    settings = make_settings(**settings_env)
    service = OpenAIService(engine, settings)
    full = create_app(engine, settings, service=service)
    cold = ColdLane(service, settings, lambda: full)
    return cold, full


async def call(app, path, body, headers=None):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://lambda") as client:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await client.post(
            path, content=content, headers={"content-type": "application/json", **(headers or {})}
        )


def normalise(response: httpx.Response):
    payload = response.json()
    if "error" in payload:
        return response.status_code, {k: payload["error"][k] for k in ("type", "code", "param")}
    choice = payload["choices"][0]
    return response.status_code, (
        choice.get("text") or choice["message"]["content"],
        choice["finish_reason"],
        payload["usage"],
    )


@pytest.mark.parametrize(("path", "body"), CASES)
def test_cold_lane_matches_fastapi(engine, path, body):
    cold, full = lanes(engine)
    cold_response = asyncio.run(call(cold, path, body))
    assert not cold.full_app_ready, "the cold lane must answer without the FastAPI app"
    full_response = asyncio.run(call(full, path, body))
    assert normalise(cold_response) == normalise(full_response)
    assert cold_response.headers["content-type"] == full_response.headers["content-type"]


def test_cold_lane_streams_the_same_sse(engine):
    cold, full = lanes(engine)
    body = {
        "messages": USER,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    def texts(response):
        events = [e[6:] for e in response.text.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        return "".join(
            c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]
        ), chunks[-1]["usage"]

    assert texts(asyncio.run(call(cold, "/v1/chat/completions", body))) == texts(
        asyncio.run(call(full, "/v1/chat/completions", body))
    )


def test_cold_lane_enforces_api_key_and_body_limit(engine):
    cold, full = lanes(engine, API_KEY="sk-test", MAX_REQUEST_BYTES="2048")
    for app in (cold, full):
        denied = asyncio.run(call(app, "/v1/completions", {"prompt": "x"}))
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "invalid_api_key"
        big = asyncio.run(
            call(
                app,
                "/v1/completions",
                {"prompt": "x" * 5000},
                headers={"authorization": "Bearer sk-test"},
            )
        )
        assert big.status_code == 413
    assert not cold.full_app_ready


def test_other_routes_go_to_the_full_app(engine):
    cold, _ = lanes(engine)

    async def get_models():
        transport = httpx.ASGITransport(app=cold)
        async with httpx.AsyncClient(transport=transport, base_url="http://lambda") as client:
            return await client.get("/v1/models")

    assert asyncio.run(get_models()).json()["object"] == "list"
    assert cold.full_app_ready


def test_lambda_init_does_not_import_fastapi():
    import subprocess

    from tests.conftest import ROOT, model_path

    code = (
        "import sys, handler.lambda_function as f; "
        "print('fastapi' in sys.modules, 'numpy' in sys.modules, 'llama_cpp.llama' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"MODEL_URI": str(model_path()), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    ).stdout.split()
    assert out == ["False", "False", "False"]
