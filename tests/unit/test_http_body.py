"""GIVEN request bodies as bytes WHEN parsed by the framework-free door (`parse_body`) THEN the
errors match what the FastAPI app says: text that is not UTF-8 names its field, and what
neither JSON reader takes stays `invalid_json`."""

from __future__ import annotations

import json

import pytest

from handler.errors import InvalidRequest
from handler.service.schemas import CompletionRequest, EmbeddingRequest
from handler.web.http import parse_body, render_json


def rejection(schema, body: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_body(schema, body)
    return caught.value


def test_a_surrogate_escape_names_the_field_not_the_body():
    # pydantic's JSON parser refuses the escape; json.loads (FastAPI's reader) takes it.
    error = rejection(CompletionRequest, b'{"prompt": "\\ud800", "max_tokens": 2}')
    assert error.param == "prompt"
    assert "UTF-8" in error.message
    assert rejection(EmbeddingRequest, b'{"input": ["a", "\\udc00"]}').param == "input"


def test_a_surrogate_escape_in_a_body_that_is_no_object_is_still_about_the_body():
    assert (
        rejection(CompletionRequest, b'["\\ud800"]').message == "request body must be a JSON object"
    )


@pytest.mark.parametrize("body", [b"{nope", b'{"prompt": "\xff"}', b"[" * 100_000, b"\xed\xa0\x80"])
def test_what_neither_reader_takes_is_invalid_json(body):
    # Raw invalid UTF-8 (the CESU-8 bytes of a surrogate too) and nesting past json's recursion.
    assert rejection(CompletionRequest, body).code == "invalid_json"


def test_a_valid_body_is_parsed_as_before():
    assert (
        parse_body(CompletionRequest, '{"prompt": "é \\ud83d\\ude00"}'.encode()).prompt_text
        == "é 😀"
    )


def test_render_json_escapes_what_utf8_cannot_carry():
    body = render_json({"error": {"message": "Unknown route: GET /v1/\ud800"}})
    assert json.loads(body)["error"]["message"].endswith("\ud800")
    assert render_json({"text": "é"}) == '{"text":"é"}'.encode()
