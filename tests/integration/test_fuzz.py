"""GIVEN requests generated from the app's own OpenAPI schema (schemathesis, valid and invalid)
WHEN they reach the HTTP server (on both engines), the Lambda handler's HTTP lanes, the real
emulator and direct invokes THEN no answer is a 5xx and every rejection is an OpenAI error object.

Generated bodies are shrunk before they are sent (max_tokens <= 8, short prompts, few messages),
so the fuzzing exercises validation and shapes rather than decode time.
"""

from __future__ import annotations

import base64
import copy
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from handler.aws_lambda.app import LambdaApp
from handler.config import load_settings
from handler.engine import EngineState
from handler.engine.in_process.engine import InProcessEngine
from tests.conftest import FakeContext, http_app, load_event, make_settings
from tests.integration.servers import http_server, lambda_emulator

pytestmark = pytest.mark.integration

MAX_TOKENS = 8
MAX_TEXT = 48  # characters of any text the model reads
MAX_ITEMS = 4  # messages, content parts, embedding inputs
TEXT_KEYS = ("content", "text", "prompt", "input")
TOKEN_KEYS = ("max_tokens", "max_completion_tokens")
GENERATION_KEYS = ("messages", "prompt")
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
# One llama.cpp thread: on a busy machine two threads meeting at every barrier can turn an
# 8-token answer into tens of seconds; this suite tests answers, not speed.
ENV = {"N_THREADS": "1"}


def _openapi() -> dict[str, Any]:
    # The schema needs no model: the engine is built but never started.
    config = load_settings({})
    return http_app(InProcessEngine(config), config).openapi()


SCHEMA = schemathesis.openapi.from_dict(_openapi())


def shrink(value: Any, key: str | None = None) -> Any:
    """Cap completion length and text sizes anywhere in a generated body, keep everything else."""
    if isinstance(value, dict):
        out = {k: shrink(v, k) for k, v in value.items()}
        if any(k in out for k in GENERATION_KEYS):
            for k in TOKEN_KEYS:
                if _number(out.get(k)) > MAX_TOKENS:
                    out[k] = MAX_TOKENS
            if out.get("max_tokens") is None and out.get("max_completion_tokens") is None:
                out["max_tokens"] = MAX_TOKENS  # else a chat runs to the end of the context
        return out
    if isinstance(value, list):
        limit = MAX_ITEMS if key in (*TEXT_KEYS, "messages") else len(value)
        return [shrink(v, key) for v in value[:limit]]
    if isinstance(value, str) and key in TEXT_KEYS:
        return value[:MAX_TEXT]
    return value


def _number(value: Any) -> float:
    """What pydantic's lax mode reads as a number (900, 900.0, "900"), else 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return 0.0
    try:
        return float(value)
    except ValueError:
        return 0.0


@SCHEMA.hook("map_body")
def _small_bodies(_: Any, body: Any) -> Any:
    return shrink(body)


CASES = st.one_of(
    SCHEMA.as_strategy(GenerationMode.POSITIVE), SCHEMA.as_strategy(GenerationMode.NEGATIVE)
)


# ------------------------------------------------------------------ checks


def assert_openai_error(payload: Any, where: str) -> None:
    assert isinstance(payload, dict) and set(payload) == {"error"}, f"{where}: {payload!r}"
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, f"{where}: {error!r}"
    assert isinstance(error["message"], str) and error["message"], where
    assert isinstance(error["type"], str) and error["type"], where
    assert error["param"] is None or isinstance(error["param"], str), where
    assert error["code"] is None or isinstance(error["code"], str), where


def check_http(status: int, content_type: str, body: bytes, where: str) -> None:
    """No 5xx; a 2xx stream ends with [DONE] and carries no error; any other status is an
    OpenAI error object."""
    assert status < 500, f"{where}: {status} {body[:500]!r}"
    if 200 <= status < 300:
        if content_type.startswith("text/event-stream"):
            events = [e[6:] for e in body.decode().split("\n\n") if e.startswith("data: ")]
            assert events and events[-1] == "[DONE]", f"{where}: {body[-300:]!r}"
            for event in events[:-1]:
                assert "error" not in json.loads(event), f"{where}: {event}"
        return
    assert content_type.startswith("application/json"), f"{where}: {content_type}"
    assert_openai_error(json.loads(body), f"{where}: {status}")


def request_parts(case: Any) -> dict[str, Any]:
    """Method, path, query, headers and body bytes of a generated case, as they go on the wire."""
    kwargs = case.as_transport_kwargs(base_url="http://fuzz")
    quoted = {k: quote(str(v), safe="") for k, v in (case.path_parameters or {}).items()}
    request = httpx.Request(
        kwargs["method"],
        "http://fuzz" + case.path.format(**quoted),
        params=kwargs.get("params") or None,
        headers=kwargs.get("headers") or None,
        json=kwargs.get("json"),
        content=kwargs.get("data"),
    )
    return {
        "method": request.method,
        "path": request.url.raw_path.decode().partition("?")[0],
        "query": request.url.query.decode(),
        "headers": dict(request.headers),
        "body": request.read(),
    }


# ------------------------------------------------------------------ server mode


def llama_server_env() -> dict[str, str]:
    """INFERENCE_ENGINE=llama-server with the binary `make bench-anchors` builds."""
    default = Path.home() / ".cache/coldstart/llama.cpp-build/bin/llama-server"
    path = Path(os.environ.get("COLDSTART_LLAMA_SERVER", default))
    if not path.is_file():
        pytest.fail(f"llama-server missing at {path}: run `make bench-anchors` (make test does)")
    return {
        "INFERENCE_ENGINE": "llama-server",
        "LLAMA_SERVER_BIN": str(path),
        "PARALLEL_SLOTS": "2",
    }


@pytest.fixture(scope="module", params=["llama", "llama-server"])
def server(request):
    """The HTTP server on each inference engine."""
    env = {**ENV, **(llama_server_env() if request.param == "llama-server" else {})}
    with http_server(env) as base, httpx.Client(base_url=base, timeout=60) as client:
        yield client


@FUZZ
@given(data=st.data())
def test_server_answers_every_generated_request_without_5xx(server, data):
    parts = request_parts(data.draw(CASES))
    where = f"{parts['method']} {parts['path']} {parts['body'][:300]!r}"
    note(where)
    response = server.request(
        parts["method"],
        parts["path"] + (f"?{parts['query']}" if parts["query"] else ""),
        headers={k: v for k, v in parts["headers"].items() if k not in ("host", "content-length")},
        content=parts["body"],
    )
    check_http(
        response.status_code, response.headers.get("content-type", ""), response.content, where
    )


# ------------------------------------------------------------------ Lambda handler

EVENT = load_event("function-url-chat.json")


def function_url_event(
    method: str, path: str, query: str, headers: dict[str, str], body: bytes
) -> dict[str, Any]:
    """`body` sent to `path` as a function URL event (base64 when it is not UTF-8)."""
    event = copy.deepcopy(EVENT)
    event["rawPath"] = event["requestContext"]["http"]["path"] = path
    event["requestContext"]["http"]["method"] = method
    event["rawQueryString"] = query
    event["headers"] = {**event["headers"], **{k.lower(): v for k, v in headers.items()}}
    event["headers"].pop("content-length", None)
    try:
        event["body"], event["isBase64Encoded"] = body.decode(), False
    except UnicodeDecodeError:
        event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode(), True
    if not body:
        event.pop("body")
    return event


def check_lambda_http(result: dict[str, Any], where: str) -> None:
    body = result.get("body") or ""
    raw = base64.b64decode(body) if result.get("isBase64Encoded") else body.encode()
    headers = {k.lower(): v for k, v in (result.get("headers") or {}).items()}
    check_http(result["statusCode"], headers.get("content-type", ""), raw, where)


@pytest.fixture(scope="module")
def fuzz_engine():
    engine = InProcessEngine(make_settings(**ENV))
    engine.start()
    assert engine.wait_loaded(60) in (EngineState.READY, EngineState.WARM)
    return engine


@pytest.fixture(scope="module", params=["plain-app", "fastapi"])
def invoke(request, fuzz_engine):
    """Invoke the handler with its plain app in front (a fresh handler per event, as on a cold
    start) or with the FastAPI app built."""
    settings = make_settings(**ENV)
    warm = LambdaApp(fuzz_engine, settings)
    assert warm.full_app() is not None

    def call(event: Any) -> Any:
        app = warm
        if request.param == "plain-app":
            app = LambdaApp(fuzz_engine, settings)
            app.cold = False  # no FastAPI build in the background
        return app(event, FakeContext())

    return call


@FUZZ
@given(data=st.data())
def test_lambda_function_url_answers_every_generated_request_without_5xx(invoke, data):
    parts = request_parts(data.draw(CASES))
    result = invoke(function_url_event(**parts))
    check_lambda_http(result, f"{parts['method']} {parts['path']} {parts['body'][:300]!r}")


@pytest.fixture(scope="module")
def emulator():
    with lambda_emulator(ENV) as url, httpx.Client(timeout=60) as client:
        yield lambda event: client.post(url, json=event)


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_emulator_answers_every_generated_request_without_5xx(emulator, data):
    # The real path on Lambda: the RIE, awslambdaric, Mangum and back as JSON.
    parts = request_parts(data.draw(CASES))
    where = f"{parts['method']} {parts['path']} {parts['body'][:300]!r}"
    note(where)
    response = emulator(function_url_event(**parts))
    assert response.status_code == 200, f"{where}: {response.text[:500]}"
    check_lambda_http(response.json(), where)


ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/nope"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=MAX_TEXT),
    lambda inner: (
        st.lists(inner, max_size=MAX_ITEMS)
        | st.dictionaries(st.sampled_from([*GENERATION_KEYS, *TEXT_KEYS, "stream", "role"]), inner)
    ),
    max_leaves=12,
)
RAW_BODIES = st.one_of(
    st.binary(max_size=64),
    JSON_VALUES.map(lambda v: json.dumps(shrink(v)).encode()),
)


@FUZZ
@given(
    method=st.sampled_from(["POST", "GET", "PUT", "DELETE"]),
    path=st.sampled_from(ROUTES),
    content_type=st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "text/plain", ""]
    ),
    body=RAW_BODIES,
)
def test_lambda_answers_arbitrary_bodies_without_5xx(invoke, method, path, content_type, body):
    headers = {"content-type": content_type} if content_type else {}
    event = function_url_event(method, path, "", headers, body)
    if not content_type:
        event["headers"].pop("content-type")
    result = invoke(event)
    check_lambda_http(result, f"{method} {path} {content_type!r} {body[:300]!r}")


def check_direct(result: Any, where: str) -> None:
    """A direct invoke answers an OpenAI object, or an OpenAI error object that is not a 5xx."""
    assert isinstance(result, dict), where
    if "error" in result:
        assert_openai_error(result, where)
        assert result["error"]["type"] != "server_error", f"{where}: {result}"
    else:
        assert result.get("object") in ("chat.completion", "text_completion", "list"), where


@pytest.fixture(scope="module")
def direct_app(fuzz_engine):
    return LambdaApp(fuzz_engine, make_settings(**ENV))


@FUZZ
@given(data=st.data())
def test_direct_invoke_answers_every_generated_body(direct_app, data):
    try:  # a direct invoke's payload is whatever JSON Lambda parsed
        body = json.loads(json.dumps(data.draw(CASES).body))
    except (TypeError, ValueError):
        return
    if not isinstance(body, dict) or not any(k in body for k in (*GENERATION_KEYS, "input")):
        return  # not a direct invoke; the HTTP tests cover it
    result = direct_app(body, FakeContext())
    check_direct(result, f"direct {json.dumps(body, default=repr)[:300]}")


# ------------------------------------------------------------------ what the fuzzing found


def post(invoke: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    headers = {"content-type": "application/json"}
    result = invoke(function_url_event("POST", path, "", headers, json.dumps(body).encode()))
    return result["statusCode"], json.loads(result["body"])


def test_empty_completion_prompt_is_a_400_not_a_500(invoke):
    # The model adds no BOS, so "" has no tokens, and llama.cpp cannot decode an empty batch.
    for stream in (False, True):
        body = {"prompt": "", "max_tokens": 4, "stream": stream}
        status, payload = post(invoke, "/v1/completions", body)
        assert status == 400
        assert_openai_error(payload, "empty prompt")
        assert payload["error"]["param"] == "prompt"


def test_presence_and_frequency_penalties_generate(invoke):
    # They once reached llama.cpp's penalties sampler with one argument missing: a 500.
    body = {"messages": [{"role": "user", "content": "a a a a"}], "max_tokens": 4}
    for penalties in ({"presence_penalty": 1.5}, {"frequency_penalty": -1.0}):
        status, payload = post(invoke, "/v1/chat/completions", {**body, **penalties})
        assert status == 200, payload
        assert payload["usage"]["completion_tokens"] >= 1
