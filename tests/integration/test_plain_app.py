"""GIVEN the plain ASGI app and the FastAPI app, both built from the one route table on one engine,
WHEN the same requests reach both THEN status, error objects and (at temperature 0) answers are
the same, and the plain app never needs FastAPI."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from bench.common import free_port, serve_command, stop
from handler.service.openai_service import OpenAIService
from handler.web.fastapi_app import create_app
from handler.web.plain_app import PlainApp
from handler.web.routes import ROUTES
from tests.conftest import make_settings
from tests.integration.servers import _env, wait_until

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
    ("/v1/chat/completions", {"messages": USER, "n": 99}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w " * 3000}]}),
    ("/v1/completions", {"prompt": ["a", "b"]}),
    ("/v1/completions", {}),
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", b"[1, 2]"),
    ("/v1/chat/completions", b""),
]


GET_CASES = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/SmolLM2-135M-Instruct.Q4_1"),
    ("GET", "/v1/models/no-such-model"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/v1/nothing-here"),
    ("GET", "/v1/chat/completions"),
    ("DELETE", "/v1/models"),
]


class Apps:
    """Both apps on one service; the plain one's fallback counts its uses."""

    def __init__(self, engine, **settings_env):
        settings = make_settings(**settings_env)
        service = OpenAIService(engine, settings)
        self.full = create_app(service)
        self.fallback_used = 0
        self.plain = PlainApp(service, settings, fallback=self._fallback)

    def _fallback(self):
        self.fallback_used += 1
        return self.full


def lanes(engine, **settings_env):
    apps = Apps(engine, **settings_env)
    return apps.plain, apps.full, apps


async def call(app, path, body, headers=None, method="POST"):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://lambda") as client:
        if method != "POST":
            return await client.request(method, path, headers=headers)
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await client.post(
            path, content=content, headers={"content-type": "application/json", **(headers or {})}
        )


def normalise(response: httpx.Response):
    payload = response.json()
    if "error" in payload:
        return response.status_code, {k: payload["error"][k] for k in ("type", "code", "param")}
    if "choices" not in payload:
        return response.status_code, payload
    choice = payload["choices"][0]
    return response.status_code, (
        choice.get("text") or choice["message"]["content"],
        choice["finish_reason"],
        payload["usage"],
    )


@pytest.mark.parametrize(("path", "body"), CASES)
def test_plain_app_matches_fastapi(engine, path, body):
    cold, full, apps = lanes(engine)
    cold_response = asyncio.run(call(cold, path, body))
    assert apps.fallback_used == 0, "the plain app must answer without the FastAPI app"
    full_response = asyncio.run(call(full, path, body))
    assert normalise(cold_response) == normalise(full_response)
    assert cold_response.headers["content-type"] == full_response.headers["content-type"]


@pytest.mark.parametrize(("method", "path"), GET_CASES)
def test_plain_app_matches_fastapi_on_every_other_route(engine, method, path):
    cold, full, apps = lanes(engine)
    cold_response = asyncio.run(call(cold, path, None, method=method))
    full_response = asyncio.run(call(full, path, None, method=method))
    assert apps.fallback_used == 0
    assert cold_response.status_code == full_response.status_code
    assert cold_response.headers["content-type"] == full_response.headers["content-type"]
    assert normalise(cold_response) == normalise(full_response)


def test_every_route_of_the_table_is_in_both_apps(engine):
    cold, full, _ = lanes(engine)
    fastapi_paths = {(m, r.path) for r in full.routes for m in getattr(r, "methods", ())}
    for route in ROUTES:
        assert (route.method, route.path) in fastapi_paths
        path = route.path.replace("{model_id:path}", "x")
        response = asyncio.run(call(cold, path, {} if route.schema else None, method=route.method))
        assert response.status_code not in (404, 405) or "model" in path


def test_metrics_text_is_the_same(engine):
    cold, full, _ = lanes(engine)
    a = asyncio.run(call(cold, "/metrics", None, method="GET"))
    b = asyncio.run(call(full, "/metrics", None, method="GET"))
    assert a.status_code == b.status_code == 200
    assert a.headers["content-type"] == b.headers["content-type"]
    assert "coldstart_queue_depth" in a.text


def test_plain_app_streams_the_same_sse(engine):
    cold, full, _ = lanes(engine)
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


def test_plain_app_enforces_api_key_and_body_limit(engine):
    cold, full, apps = lanes(engine, API_KEY="sk-test", MAX_REQUEST_BYTES="2048")
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
        models = asyncio.run(call(app, "/v1/models", None, method="GET"))
        assert models.status_code == 401
        health = asyncio.run(call(app, "/healthz", None, method="GET"))
        assert health.status_code == 200  # liveness needs no key
    assert apps.fallback_used == 0


def test_a_body_that_is_not_json_goes_to_the_fastapi_app(engine):
    cold, _, apps = lanes(engine)
    response = asyncio.run(
        call(cold, "/v1/completions", b"prompt=x", headers={"content-type": "text/plain"})
    )
    assert response.status_code == 400
    assert apps.fallback_used == 1


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


def test_serve_answers_without_fastapi_until_a_body_needs_it():
    """GIVEN `python -m handler serve` WHEN JSON requests come THEN FastAPI is never imported (a
    cold start does not pay for it); a body that is not JSON goes to the FastAPI app, built
    then, and its answer is an OpenAI error object too."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile() as log:
        proc = subprocess.Popen(
            serve_command(port),
            env=_env({"PYTHONPROFILEIMPORTTIME": "1"}),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            wait_until(lambda: httpx.get(base + "/readyz", timeout=1).status_code == 200, 60, proc)
            body = {"prompt": "The sky is", "max_tokens": 2}
            assert httpx.post(base + "/v1/completions", json=body).status_code == 200

            def imported(module: str) -> bool:
                text = Path(log.name).read_text(errors="replace")
                return re.search(rf"\|\s+{re.escape(module)}$", text, re.MULTILINE) is not None

            assert imported("handler.web.plain_app")
            assert not imported("fastapi")
            odd = httpx.post(
                base + "/v1/completions",
                content=json.dumps(body),
                headers={"content-type": "text/plain"},
            )
            assert odd.status_code == 400
            assert odd.json()["error"]["type"] == "invalid_request_error"
            assert imported("fastapi")
        finally:
            stop(proc, grace_s=10)
