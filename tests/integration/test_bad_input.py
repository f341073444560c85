"""GIVEN bad requests WHEN sent to the app on the real engine THEN each is a 4xx OpenAI error."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.conftest import http_app, make_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(http_app(engine, engine.settings), raise_server_exceptions=False)


def assert_error(response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, None),
        ({"messages": [{"content": "x"}]}, None),
        ({"messages": "hello"}, "messages"),
        ({"messages": USER, "max_tokens": -1}, "max_tokens"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "max_tokens": 10**9}, "max_tokens"),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": USER, "n": 99}, "n"),
        ({}, "messages"),
    ],
)
def test_malformed_chat_is_400(client, body, param):
    error = assert_error(client.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"].startswith(param)


def test_non_json_and_empty_body_are_400(client):
    headers = {"content-type": "application/json"}
    assert_error(
        client.post("/v1/chat/completions", content=b"{nope", headers=headers),
        400,
        code="invalid_json",
    )
    assert_error(client.post("/v1/chat/completions", content=b"", headers=headers), 400)
    assert_error(client.post("/v1/chat/completions", content=b"[1,2]", headers=headers), 400)


def test_prompt_longer_than_context_is_context_length_exceeded(client):
    body = {"messages": [{"role": "user", "content": "word " * 3000}]}
    assert_error(
        client.post("/v1/chat/completions", json=body),
        400,
        code="context_length_exceeded",
        param="messages",
    )
    body = {"messages": USER, "max_tokens": 1020}
    assert_error(
        client.post("/v1/chat/completions", json=body), 400, code="context_length_exceeded"
    )
    assert_error(
        client.post("/v1/completions", json={"prompt": "x " * 3000}),
        400,
        code="context_length_exceeded",
        param="prompt",
    )


def test_unknown_route_and_method(client):
    assert_error(client.get("/v1/nothing"), 404, code="not_found")
    assert_error(client.get("/v1/chat/completions"), 405)


def test_body_over_the_limit_is_413(client):
    huge = b'{"messages": [{"role": "user", "content": "' + b"a" * 2_000_000 + b'"}]}'
    assert_error(
        client.post(
            "/v1/chat/completions", content=huge, headers={"content-type": "application/json"}
        ),
        413,
    )


def test_too_many_messages_is_400(engine):
    settings = make_settings(MAX_MESSAGES="2")
    client = TestClient(http_app(engine, settings))
    body = {"messages": USER * 3}
    assert_error(client.post("/v1/chat/completions", json=body), 400, param="messages")


def test_api_key_is_required_when_configured(engine):
    client = TestClient(http_app(engine, make_settings(API_KEY="sk-test")))
    assert_error(client.get("/v1/models"), 401, code="invalid_api_key")
    assert_error(client.get("/v1/models", headers={"authorization": "Bearer wrong"}), 401)
    ok = client.get("/v1/models", headers={"authorization": "Bearer sk-test"})
    assert ok.status_code == 200
    assert client.get("/healthz").status_code == 200  # probes never need the key


def test_bad_embedding_requests(client):
    assert_error(client.post("/v1/embeddings", json={"input": []}), 400)
    assert_error(client.post("/v1/embeddings", json={"input": [""]}), 400, param="input")
    assert_error(
        client.post("/v1/embeddings", json={"input": "x", "dimensions": 3}), 400, param="dimensions"
    )
    assert_error(client.post("/v1/embeddings", json={"input": "x", "encoding_format": "hex"}), 400)


def test_process_keeps_serving_after_bad_input(client):
    ok = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi", "name": "\\udfff"}]}',
            "messages.0.name",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi"}], "user": "\\ud800"}',
            "user",
        ),
        ("/v1/completions", b'{"prompt": "x\\ud800"}', "prompt"),
        ("/v1/embeddings", b'{"input": ["ok", "\\ud800"]}', "input"),
        ("/v1/embeddings", b'{"input": "\\u0004"}', "input"),
    ],
)
def test_text_that_is_not_utf8_or_has_no_tokens_is_400_naming_the_field(client, path, body, param):
    """GIVEN an unpaired surrogate as a JSON escape, or text of no tokens WHEN posted THEN a 400
    names the field (these were 500s: the tokenizer's UTF-8 encode, an empty decode)."""
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    error = assert_error(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("word", ["a", "😀", "\x01"])
def test_one_very_long_word_is_context_length_exceeded(client, word):
    """GIVEN one 100,000-character word (no space to split it at) WHEN sent as a prompt or a
    message THEN the tokenizer gets through it (linear: 0.3 s per 100,000 characters measured)
    and the answer is context_length_exceeded, not a hang or a 500."""
    text = word * 100_000
    assert_error(
        client.post("/v1/completions", json={"prompt": text}),
        400,
        code="context_length_exceeded",
        param="prompt",
    )
    body = {"messages": [{"role": "user", "content": text}]}
    assert_error(
        client.post("/v1/chat/completions", json=body),
        400,
        code="context_length_exceeded",
        param="messages",
    )
