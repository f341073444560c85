"""GIVEN requests generated from the app's own OpenAPI schema (schemathesis, valid and invalid),
and valid ones whose strings were swapped for hostile text (the whole code space: unpaired
surrogates, control characters, NUL, one long word, text that tokenizes to nothing)
WHEN they reach the HTTP server (on both engines), the Lambda handler's HTTP lanes (every event
source, base64 bodies included), the real emulator and direct invokes
THEN no answer is a 5xx and every rejection is an OpenAI error object.

Generated bodies are shrunk before they are sent (max_tokens <= 8, short prompts, few messages),
so the fuzzing exercises validation and shapes rather than decode time.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from handler.aws_lambda.app import LambdaApp
from handler.config import load_settings
from handler.engine import EngineState
from handler.engine.in_process.engine import InProcessEngine
from tests.conftest import FakeContext, http_app, make_settings
from tests.integration.fuzzing import (
    ANY_CHARACTER,
    ENV,
    GENERATION_KEYS,
    MAX_ITEMS,
    MAX_TEXT,
    SOURCES,
    TEXT_KEYS,
    assert_openai_error,
    check_direct,
    check_http,
    check_lambda_http,
    function_url_event,
    http_event,
    lambda_http_response,
    llama_server_env,
    request_parts,
    shrink,
    wire_json,
    with_hostile_text,
)
from tests.integration.servers import http_server, lambda_emulator

pytestmark = pytest.mark.integration

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
HOSTILE = settings(FUZZ, max_examples=40)


def _openapi() -> dict[str, Any]:
    # The schema needs no model: the engine is built but never started.
    config = load_settings({})
    return http_app(InProcessEngine(config), config).openapi()


SCHEMA = schemathesis.openapi.from_dict(_openapi())


@SCHEMA.hook("map_body")
def _small_bodies(_: Any, body: Any) -> Any:
    return shrink(body)


CASES = st.one_of(
    SCHEMA.as_strategy(GenerationMode.POSITIVE), SCHEMA.as_strategy(GenerationMode.NEGATIVE)
)
VALID_POSTS = SCHEMA.include(method="POST").as_strategy(GenerationMode.POSITIVE)


@st.composite
def hostile_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid generated POST whose strings are partly hostile text, as wire parts: the JSON
    escapes every non-ASCII character, or only the unpaired surrogates."""
    case = draw(VALID_POSTS)
    if not isinstance(case.body, dict):
        return request_parts(case)
    body = draw(with_hostile_text(shrink(case.body)))
    return request_parts(case, wire_json(body, escape_all=draw(st.booleans())))


@st.composite
def hostile_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid generated body with hostile text, as a direct invoke's payload."""
    case = draw(VALID_POSTS)
    assume(isinstance(case.body, dict))
    return dict(draw(with_hostile_text(shrink(case.body))))


def described(parts: dict[str, Any]) -> str:
    """A request for a failure message."""
    return f"{parts['method']} {parts['path']} {parts['body'][:300]!r}"


# ------------------------------------------------------------------ server mode


@pytest.fixture(scope="module", params=["llama", "llama-server"])
def server(request):
    """The HTTP server on each inference engine."""
    env = {**ENV, **(llama_server_env() if request.param == "llama-server" else {})}
    with http_server(env) as base, httpx.Client(base_url=base, timeout=60) as client:
        yield client


def send(server: httpx.Client, parts: dict[str, Any]) -> httpx.Response:
    """Wire parts sent to the server as they are."""
    return server.request(
        parts["method"],
        parts["path"] + (f"?{parts['query']}" if parts["query"] else ""),
        headers={k: v for k, v in parts["headers"].items() if k not in ("host", "content-length")},
        content=parts["body"],
    )


def check_server(response: httpx.Response, where: str) -> None:
    check_http(
        response.status_code, response.headers.get("content-type", ""), response.content, where
    )


@FUZZ
@given(data=st.data())
def test_server_answers_every_generated_request_without_5xx(server, data):
    parts = request_parts(data.draw(CASES))
    note(described(parts))
    check_server(send(server, parts), described(parts))


@HOSTILE
@given(parts=hostile_requests())
def test_server_answers_hostile_text_without_5xx(server, parts):
    note(described(parts))
    check_server(send(server, parts), described(parts))


# ------------------------------------------------------------------ Lambda handler


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
    check_lambda_http(result, described(parts))


@HOSTILE
@given(parts=hostile_requests(), source=st.sampled_from(SOURCES), base64_body=st.booleans())
def test_every_event_source_answers_hostile_text_without_5xx(invoke, parts, source, base64_body):
    result = invoke(http_event(source, parts, base64_body=base64_body))
    check_lambda_http(result, f"{source} base64={base64_body} {described(parts)}")


@pytest.fixture(scope="module")
def emulator():
    with lambda_emulator(ENV) as url, httpx.Client(timeout=60) as client:
        # json.dumps escapes what UTF-8 cannot carry; httpx's json= would fail on it.
        yield lambda event: client.post(url, content=json.dumps(event).encode())


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_emulator_answers_every_generated_request_without_5xx(emulator, data):
    # The real path on Lambda: the RIE, awslambdaric, Mangum and back as JSON.
    parts = request_parts(data.draw(CASES))
    note(described(parts))
    response = emulator(function_url_event(**parts))
    assert response.status_code == 200, f"{described(parts)}: {response.text[:500]}"
    check_lambda_http(response.json(), described(parts))


@settings(FUZZ, max_examples=15)
@given(
    parts=hostile_requests(),
    source=st.sampled_from(SOURCES),
    base64_body=st.booleans(),
    body=hostile_bodies(),
)
def test_emulator_answers_hostile_text_without_5xx(emulator, parts, source, base64_body, body):
    # Each example sends one HTTP event and one direct invoke, both with hostile text.
    note(described(parts))
    response = emulator(http_event(source, parts, base64_body=base64_body))
    assert response.status_code == 200, f"{described(parts)}: {response.text[:500]}"
    check_lambda_http(response.json(), f"{source} {described(parts)}")
    response = emulator(body)
    assert response.status_code == 200, f"direct {body!r:.300}: {response.text[:500]}"
    check_direct(response.json(), f"direct {body!r:.300}")


ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/nope"]
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(ANY_CHARACTER, max_size=MAX_TEXT),
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


@HOSTILE
@given(body=hostile_bodies())
def test_direct_invoke_answers_hostile_text(direct_app, body):
    # What json.loads makes of the payload: unpaired surrogates arrive as they are.
    check_direct(direct_app(body, FakeContext()), f"direct {body!r:.300}")


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


SURROGATE = "\ud800"  # sent as the JSON escape "\ud800": Python decodes it, UTF-8 cannot hold it
USER = {"role": "user", "content": "hi"}
# (route, body, the param its 400 names): the outside fuzz run's 500s, and their neighbours
BAD_TEXT = [
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": SURROGATE}]},
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": SURROGATE}], "stream": True},
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
        "messages.0.content",
    ),
    ("/v1/chat/completions", {"messages": [USER], "stop": [SURROGATE]}, "stop"),
    ("/v1/completions", {"prompt": "a" + SURROGATE}, "prompt"),
    ("/v1/completions", {"prompt": [SURROGATE]}, "prompt"),
    ("/v1/embeddings", {"input": SURROGATE}, "input"),
    ("/v1/embeddings", {"input": ["fine", "\udfff"]}, "input"),
    # Text that tokenizes to nothing: control characters without a token (fuzzing.NO_TOKEN).
    ("/v1/embeddings", {"input": "\x04"}, "input"),
    ("/v1/embeddings", {"input": ["fine", "\x13\x1d"]}, "input"),
    ("/v1/completions", {"prompt": "\x16"}, "prompt"),
]
BAD_TEXT_IDS = [
    f"{path.rsplit('/', 1)[1]}-{param}-{i}" for i, (path, _, param) in enumerate(BAD_TEXT)
]


def assert_400_naming(status: int, payload: Any, param: str, where: str) -> None:
    assert status == 400, f"{where}: {status} {payload!r:.300}"
    assert_openai_error(payload, where)
    assert payload["error"]["param"] == param, f"{where}: {payload}"


def json_post(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A POST of `body` (non-ASCII as JSON escapes) as wire parts, with a small max_tokens."""
    return {
        "method": "POST",
        "path": path,
        "query": "",
        "headers": {"content-type": "application/json"},
        "body": wire_json({**body, "max_tokens": 4}, escape_all=True),
    }


@pytest.mark.parametrize(("path", "body", "param"), BAD_TEXT, ids=BAD_TEXT_IDS)
def test_bad_text_is_a_400_naming_the_field_on_the_server(server, path, body, param):
    """GIVEN text that is not UTF-8 or has no tokens WHEN posted to the HTTP server (either
    engine; llama-server refuses every embedding, naming input too) THEN a 400 names it."""
    response = send(server, json_post(path, body))
    assert_400_naming(response.status_code, response.json(), param, f"server {path}")


@pytest.mark.parametrize("base64_body", [False, True], ids=["text-body", "base64-body"])
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", BAD_TEXT, ids=BAD_TEXT_IDS)
def test_bad_text_is_a_400_naming_the_field_in_every_event(invoke, source, base64_body, case):
    """GIVEN the same bodies in every HTTP event source, as text and base64 WHEN the handler
    answers (plain app and FastAPI) THEN a 400 names the field."""
    path, body, param = case
    event = http_event(source, json_post(path, body), base64_body=base64_body)
    status, _, raw = lambda_http_response(invoke(event))
    assert_400_naming(status, json.loads(raw), param, f"{source} {path}")


@pytest.mark.parametrize(("path", "body", "param"), BAD_TEXT, ids=BAD_TEXT_IDS)
def test_bad_text_is_a_400_naming_the_field_on_direct_invoke(direct_app, path, body, param):
    """GIVEN the same bodies as direct invoke payloads (surrogates as json.loads leaves them)
    WHEN invoked THEN the error object names the field."""
    if body.get("stream"):
        return  # a direct invoke cannot stream; that has its own error
    payload = direct_app({**body, "max_tokens": 4}, FakeContext())
    assert_openai_error(payload, f"direct {path}")
    assert payload["error"]["param"] == param, payload


@pytest.mark.parametrize(("path", "body", "param"), [BAD_TEXT[0], *BAD_TEXT[4:7]])
def test_bad_text_is_a_400_under_the_emulator(emulator, path, body, param):
    """GIVEN the outside fuzz run's bodies WHEN sent through the real RIE as a function URL event
    (as text and base64) and as a direct invoke THEN each names the field."""
    for base64_body in (False, True):
        event = http_event("function-url", json_post(path, body), base64_body=base64_body)
        status, _, raw = lambda_http_response(emulator(event).json())
        assert_400_naming(status, json.loads(raw), param, f"emulator {path}")
    payload = emulator({**body, "max_tokens": 4}).json()
    assert_openai_error(payload, f"emulator direct {path}")
    assert payload["error"]["param"] == param, payload


def _event_with(where: str) -> dict[str, Any]:
    """A function URL event with an unpaired surrogate as a character of the event itself, not
    a JSON escape in the body: AWS never sends one, a hand-made direct invoke can."""
    path = {"path": f"/v1/{SURROGATE}", "model-id": f"/v1/models/{SURROGATE}"}.get(where)
    method = "GET" if where == "model-id" else "POST"
    event = http_event("function-url", json_post(path or "/v1/completions", {"prompt": "Hi"}))
    event["rawPath"] = event["requestContext"]["http"]["path"]
    event["requestContext"]["http"]["method"] = method
    if where == "body":
        event["body"] = '{"prompt": "' + SURROGATE + '", "max_tokens": 2}'
    if where == "header":
        event["headers"]["x-note"] = SURROGATE
    if where == "query":
        event["rawQueryString"] = f"q={SURROGATE}"
    if method == "GET":
        event.pop("body")
    return event


@pytest.mark.parametrize(
    ("lane", "where"),
    [
        (lane, where)
        for lane in ("plain-app", "fastapi")
        for where in ("path", "model-id", "body", "header", "query")
    ],
)
def test_event_text_that_is_not_utf8_is_never_a_5xx(fuzz_engine, lane, where):
    """GIVEN an unpaired surrogate in an HTTP event's path, body, header or query string WHEN
    the handler answers THEN no 5xx (404 for the paths, echoing it as an escape)."""
    app = LambdaApp(fuzz_engine, make_settings(**ENV))
    if lane == "fastapi":
        app.full_app()
    else:
        app.cold = False
    check_lambda_http(app(_event_with(where), FakeContext()), f"{lane} {where}")
