"""What the fuzz tests share: body shrinking, hostile text, every Lambda event shape, the checks.

Not a test module: `test_fuzz.py` draws its cases through these helpers.
"""

from __future__ import annotations

import base64
import copy
import json
import operator
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import httpx
import pytest
from hypothesis import strategies as st

from tests.conftest import load_event

MAX_TOKENS = 8
MAX_TEXT = 48  # characters of any text the model reads
MAX_ITEMS = 4  # messages, content parts, embedding inputs
TEXT_KEYS = ("content", "text", "prompt", "input")
TOKEN_KEYS = ("max_tokens", "max_completion_tokens")
GENERATION_KEYS = ("messages", "prompt")
# One llama.cpp thread: on a busy machine two threads meeting at every barrier can turn an
# 8-token answer into tens of seconds; this suite tests answers, not speed.
ENV = {"N_THREADS": "1"}


# ------------------------------------------------------------------ bodies


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


# ------------------------------------------------------------------ hostile text

# The whole code space: unpaired surrogates (category Cs, which schemathesis never generates:
# it cannot encode them for the wire), control characters, NUL, non-characters, astral planes.
ANY_CHARACTER = st.characters()
# Characters with no tokens in SmolLM2's vocabulary: a text of only these tokenizes to nothing.
NO_TOKEN = "\x04\x06\x13\x14\x16\x1d"
# Characters a tokenizer may drop or fold.
INVISIBLE = st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Co"])
# Hypothesis draws mostly low code points; surrogates, NUL and the no-token characters are
# drawn on purpose, or one text in a hundred would carry one.
HOSTILE_CHARACTER = st.one_of(
    ANY_CHARACTER,
    st.characters(categories=["Cs"]),
    st.sampled_from("\x00" + NO_TOKEN),
    INVISIBLE,
)
LONG_WORD = (64, 256)  # one character repeated, no spaces: a single pre-token to merge
EDGE_TEXTS = (
    "\ud800",
    "\udfff",
    "a\ud800b",
    "\ud83d",  # half of an emoji
    "\x00",
    "\x04",
    NO_TOKEN,
    "\x7f",
    "\u200b",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "<|im_end|>",
    "",
)
HOSTILE_TEXT = st.one_of(
    st.text(HOSTILE_CHARACTER, max_size=MAX_TEXT),
    st.text(st.one_of(st.sampled_from(NO_TOKEN), INVISIBLE), min_size=1, max_size=3),
    st.builds(operator.mul, HOSTILE_CHARACTER, st.integers(*LONG_WORD)),
    st.sampled_from(EDGE_TEXTS),
)


# Fields whose value is one of a few words: hostile text there is only ever a 400, and the
# negative cases from the schema already send those; keeping them valid lets the text through.
ENUM_KEYS = ("role", "type", "encoding_format")


@st.composite
def with_hostile_text(draw: st.DrawFn, body: Any) -> Any:
    """`body` with some of its free-text strings (each with even odds) replaced by hostile text."""

    def replace(value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: replace(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [replace(v, key) for v in value]
        if isinstance(value, str) and key not in ENUM_KEYS and draw(st.booleans()):
            return draw(HOSTILE_TEXT)
        return value

    return replace(body)


def wire_json(body: Any, escape_all: bool) -> bytes:
    """`body` as a client puts it on the wire: every non-ASCII character as a `\\u` escape
    (json.dumps' default), or raw UTF-8 with only what UTF-8 cannot carry (unpaired
    surrogates) escaped, as a client that writes its JSON by hand might."""
    if escape_all:
        return json.dumps(body).encode()
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "backslashreplace")


# ------------------------------------------------------------------ requests and events


def request_parts(case: Any, body: bytes | None = None) -> dict[str, Any]:
    """Method, path, query, headers and body bytes of a generated case, as they go on the wire
    (`body` replaces the case's own, as JSON)."""
    kwargs = case.as_transport_kwargs(base_url="http://fuzz")
    quoted = {k: quote(str(v), safe="") for k, v in (case.path_parameters or {}).items()}
    headers = dict(kwargs.get("headers") or {})
    if body is not None:
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        headers["content-type"] = "application/json"
    request = httpx.Request(
        kwargs["method"],
        "http://fuzz" + case.path.format(**quoted),
        params=kwargs.get("params") or None,
        headers=headers or None,
        json=kwargs.get("json") if body is None else None,
        content=kwargs.get("data") if body is None else body,
    )
    return {
        "method": request.method,
        "path": request.url.raw_path.decode().partition("?")[0],
        "query": request.url.query.decode(),
        "headers": dict(request.headers),
        "body": request.read(),
    }


SOURCES = ("function-url", "apigw-v2", "apigw-v1", "alb")
_SAMPLES = {
    "function-url": "function-url-chat.json",
    "apigw-v2": "apigw-v2-chat.json",
    "apigw-v1": "apigw-v1-chat.json",
    "alb": "alb-chat.json",
}


def http_event(
    source: str, request: dict[str, Any], *, base64_body: bool = False
) -> dict[str, Any]:
    """A request (`request_parts`' keys) as the event `source` delivers it, from its sample in
    events/; the body in base64 when asked, or when it is not UTF-8 (as Lambda does)."""
    event = copy.deepcopy(load_event(_SAMPLES[source]))
    method, path, query, body = (request[k] for k in ("method", "path", "query", "body"))
    headers = {k.lower(): v for k, v in request["headers"].items() if k.lower() != "content-length"}
    if source in ("function-url", "apigw-v2"):
        event["rawPath"] = event["requestContext"]["http"]["path"] = path
        event["requestContext"]["http"]["method"] = method
        event["rawQueryString"] = query
        event["headers"] = {**event["headers"], **headers}
        event["headers"].pop("content-length", None)
    else:
        event["path"], event["httpMethod"] = path, method
        params = dict(parse_qsl(query, keep_blank_values=True))
        event["queryStringParameters"] = params or ({} if source == "alb" else None)
        event["headers"] = {**event["headers"], **headers}
        if source == "apigw-v1":
            event["multiValueQueryStringParameters"] = {k: [v] for k, v in params.items()} or None
            event["multiValueHeaders"] = {k: [v] for k, v in event["headers"].items()}
    event["body"], event["isBase64Encoded"] = _event_body(body, base64_body)
    if not body:
        event.pop("body")
    return event


def _event_body(body: bytes, base64_body: bool) -> tuple[str, bool]:
    if not base64_body:
        try:
            return body.decode(), False
        except UnicodeDecodeError:
            pass
    return base64.b64encode(body).decode(), True


def function_url_event(
    method: str, path: str, query: str, headers: dict[str, str], body: bytes
) -> dict[str, Any]:
    """`body` sent to `path` as a function URL event (base64 when it is not UTF-8)."""
    request = {"method": method, "path": path, "query": query, "headers": headers, "body": body}
    return http_event("function-url", request)


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


# ------------------------------------------------------------------ checks


def check_stream(text: str, where: str) -> None:
    """A streamed 2xx answer: every event but the end parses and is no error; it ends as its API
    ends a stream."""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    named = bool(blocks) and blocks[0].startswith("event: ")
    data = [line[6:] for b in blocks for line in b.split("\n") if line.startswith("data: ")]
    assert data, f"{where}: {text[-300:]!r}"
    if named:
        events = [json.loads(d) for d in data]
        assert all(e["type"] != "error" for e in events), f"{where}: {text[-300:]!r}"
        assert events[-1]["type"] in RESPONSE_ENDS, f"{where}: {text[-300:]!r}"
        return
    assert data[-1] == "[DONE]", f"{where}: {text[-300:]!r}"
    for event in data[:-1]:
        assert "error" not in json.loads(event), f"{where}: {event}"


def assert_openai_error(payload: Any, where: str) -> None:
    """`payload` is exactly `{"error": {"message", "type", "param", "code"}}`."""
    assert isinstance(payload, dict) and set(payload) == {"error"}, f"{where}: {payload!r}"
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, f"{where}: {error!r}"
    assert isinstance(error["message"], str) and error["message"], where
    assert isinstance(error["type"], str) and error["type"], where
    assert error["param"] is None or isinstance(error["param"], str), where
    assert error["code"] is None or isinstance(error["code"], str), where


# How a stream of the Responses API ends: named events, no [DONE] after the last.
RESPONSE_ENDS = ("response.completed", "response.incomplete")


def check_http(status: int, content_type: str, body: bytes, where: str) -> None:
    """No 5xx; a 2xx stream carries no error and ends as its API ends one (chat and text
    completions: [DONE]; the Responses API's named events: response.completed or
    response.incomplete); any other status is an OpenAI error object."""
    assert status < 500, f"{where}: {status} {body[:500]!r}"
    if 200 <= status < 300:
        if content_type.startswith("text/event-stream"):
            check_stream(body.decode(), where)
        return
    assert content_type.startswith("application/json"), f"{where}: {content_type}"
    assert_openai_error(json.loads(body), f"{where}: {status}")


def lambda_http_response(result: dict[str, Any]) -> tuple[int, str, bytes]:
    """Status, content type and body bytes of an HTTP event's answer."""
    body = result.get("body") or ""
    raw = base64.b64decode(body) if result.get("isBase64Encoded") else body.encode()
    headers = {k.lower(): v for k, v in (result.get("headers") or {}).items()}
    return result["statusCode"], headers.get("content-type", ""), raw


def check_lambda_http(result: dict[str, Any], where: str) -> None:
    """An HTTP event's answer passes `check_http`."""
    check_http(*lambda_http_response(result), where)


def check_direct(result: Any, where: str) -> None:
    """A direct invoke answers an OpenAI object, or an OpenAI error object that is not a 5xx."""
    assert isinstance(result, dict), where
    if result.get("object") != "response" and "error" in result:  # a response has error: null
        assert_openai_error(result, where)
        assert result["error"]["type"] != "server_error", f"{where}: {result}"
    else:
        objects = ("chat.completion", "text_completion", "list", "response")
        assert result.get("object") in objects, where
