"""GIVEN OpenAI request bodies WHEN validated THEN accepted or rejected as OpenAI would."""

from __future__ import annotations

import base64
import struct
import typing
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from handler.service.objects import encode_embedding
from handler.service.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    ChosenFunction,
    CompletionRequest,
    EmbeddingRequest,
    FunctionCall,
    FunctionDefinition,
    JsonSchemaFormat,
    ResponseFormat,
    SamplingRequest,
    TextPart,
    ToolCall,
    not_utf8,
)


def chat(**fields):
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def test_minimal_chat_request_and_defaults():
    req = chat()
    assert req.stream is False
    assert req.token_limit is None
    assert req.stop_list() == ()


def test_text_parts_are_joined():
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ]
        }
    )
    assert req.messages[0].text() == "ab"


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_tokens=5, max_completion_tokens=7).token_limit == 7


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user"}]},
        {"messages": "hello"},
        {"max_tokens": 0},
        {"max_tokens": -5},
        {"temperature": 3},
        {"top_p": 0},
        {"n": 0},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": [""]},
        {"top_logprobs": 2},
        {"logprobs": True, "top_logprobs": 21},
        {"tools": [{"type": "function", "function": {"name": "has space"}}]},
        {"tools": [{"type": "retrieval"}]},
        {"tool_choice": "sometimes"},
        {"response_format": {"type": "json_schema"}},
        {"response_format": {"type": "yaml"}},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        {"functions": [{"name": "f"}]},
        {"function_call": "auto"},
        {"logit_bias": {"50256": -100}},
        {"modalities": ["text", "audio"]},
        {"audio": {"voice": "alloy", "format": "wav"}},
        {"web_search_options": {}},
        {"presence_penalty": 9},
    ],
)
def test_invalid_chat_requests_are_rejected(fields):
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_assistant_message_may_omit_content():
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}
    )
    assert req.messages[1].text() == ""


def test_stream_options_include_usage_only_when_streaming():
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=False, stream_options={"include_usage": True}).include_usage


def test_completion_request_defaults_to_16_tokens_and_one_prompt():
    req = CompletionRequest.model_validate({"prompt": ["once upon"]})
    assert req.max_tokens == 16
    assert req.prompt_text == "once upon"
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": ["a", "b"]})
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "a", "suffix": "b"})


def test_embedding_inputs_and_base64_encoding_roundtrip():
    req = EmbeddingRequest.model_validate({"input": "x", "encoding_format": "base64"})
    assert req.texts() == ["x"]
    vector = [0.5, -1.25, 3.0]
    encoded = encode_embedding(vector, "base64")
    assert isinstance(encoded, str)
    assert list(struct.unpack("<3f", base64.b64decode(encoded))) == vector
    assert encode_embedding(vector, "float") == vector


# ------------------------------------------------------------------ text that is not UTF-8

SURROGATE = "\ud800"  # what json.loads makes of the JSON escape "\ud800": no UTF-8 for it
USER = {"role": "user", "content": "hi"}


# (request schema, the field that carries the text, body, the param a 400 names)
def tool(**function):
    return {"type": "function", "function": {"name": "f", **function}}


def assistant_call(id="call_1", name="f", arguments="{}"):
    call = {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}
    return {"role": "assistant", "tool_calls": [call]}


NOT_UTF8 = [
    (
        ChatCompletionRequest,
        ChatMessage,
        "content",
        {"messages": [{"role": "user", "content": SURROGATE}]},
        "messages.0.content",
    ),
    (
        ChatCompletionRequest,
        TextPart,
        "text",
        {
            "messages": [
                USER,
                {"role": "user", "content": [{"type": "text", "text": "a" + SURROGATE}]},
            ]
        },
        "messages.1.content",
    ),
    (
        ChatCompletionRequest,
        ChatMessage,
        "name",
        {"messages": [{**USER, "name": SURROGATE}]},
        "messages.0.name",
    ),
    (
        ChatCompletionRequest,
        SamplingRequest,
        "stop",
        {"messages": [USER], "stop": SURROGATE},
        "stop",
    ),
    (
        ChatCompletionRequest,
        SamplingRequest,
        "stop",
        {"messages": [USER], "stop": ["ok", SURROGATE]},
        "stop",
    ),
    (
        ChatCompletionRequest,
        SamplingRequest,
        "model",
        {"messages": [USER], "model": SURROGATE},
        "model",
    ),
    (
        ChatCompletionRequest,
        SamplingRequest,
        "user",
        {"messages": [USER], "user": SURROGATE},
        "user",
    ),
    *[
        (ChatCompletionRequest, owner, field, {"messages": [USER], **body}, param)
        for owner, field, body, param in [
            (
                FunctionDefinition,
                "name",
                {"tools": [tool(name=SURROGATE)]},
                "tools.0.function.name",
            ),
            (FunctionDefinition, "description", {"tools": [tool(description=SURROGATE)]}, "tools"),
            (
                FunctionDefinition,
                "parameters",
                {"tools": [tool(parameters={SURROGATE: 1})]},
                "tools",
            ),
            (
                ChosenFunction,
                "name",
                {"tool_choice": {"type": "function", "function": {"name": SURROGATE}}},
                "tool_choice",
            ),
            (
                JsonSchemaFormat,
                "name",
                {
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": SURROGATE, "schema": {}},
                    }
                },
                "response_format.json_schema.name",
            ),
            (
                JsonSchemaFormat,
                "description",
                {
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"description": SURROGATE, "schema": {}},
                    }
                },
                "response_format",
            ),
            (
                JsonSchemaFormat,
                "schema_",
                {
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"schema": {"title": SURROGATE}},
                    }
                },
                "response_format",
            ),
            (
                ResponseFormat,
                "schema_",
                {"response_format": {"type": "json_object", "schema": {"title": SURROGATE}}},
                "response_format",
            ),
        ]
    ],
    *[
        (ChatCompletionRequest, owner, field, {"messages": [USER, message]}, param)
        for owner, field, message, param in [
            (
                ChatMessage,
                "tool_call_id",
                {"role": "tool", "content": "x", "tool_call_id": SURROGATE},
                "messages.1.tool_call_id",
            ),
            (ToolCall, "id", assistant_call(id=SURROGATE), "messages.1.tool_calls.0.id"),
            (
                FunctionCall,
                "name",
                assistant_call(name=SURROGATE),
                "messages.1.tool_calls.0.function.name",
            ),
            (
                FunctionCall,
                "arguments",
                assistant_call(arguments=SURROGATE),
                "messages.1.tool_calls",
            ),
        ]
    ],
    (CompletionRequest, CompletionRequest, "prompt", {"prompt": SURROGATE}, "prompt"),
    (CompletionRequest, CompletionRequest, "prompt", {"prompt": ["\udfff"]}, "prompt"),
    (
        CompletionRequest,
        CompletionRequest,
        "suffix",
        {"prompt": "x", "suffix": SURROGATE},
        "suffix",
    ),
    (EmbeddingRequest, EmbeddingRequest, "input", {"input": SURROGATE}, "input"),
    (EmbeddingRequest, EmbeddingRequest, "input", {"input": ["ok", "x" + SURROGATE]}, "input"),
    (EmbeddingRequest, EmbeddingRequest, "model", {"input": "x", "model": SURROGATE}, "model"),
    (EmbeddingRequest, EmbeddingRequest, "user", {"input": "x", "user": SURROGATE}, "user"),
]


@pytest.mark.parametrize(("schema", "owner", "field", "body", "param"), NOT_UTF8)
def test_text_that_is_not_utf8_is_rejected_naming_the_field(schema, owner, field, body, param):
    """GIVEN an unpaired surrogate in one text field WHEN the body is validated THEN the first
    error is at that field (the loc a 400 turns into its param): our `invalid_utf8`, or
    pydantic's own `string_unicode` where a length limit makes it read the string itself."""
    with pytest.raises(ValidationError) as caught:
        schema.model_validate(body)
    first = caught.value.errors()[0]
    assert ".".join(str(p) for p in first["loc"]) == param
    assert first["type"] in ("invalid_utf8", "string_unicode")
    if first["type"] == "invalid_utf8":
        assert "U+D800" in first["msg"] or "U+DFFF" in first["msg"]


def _text_fields(model: type[BaseModel]) -> set[tuple[type[BaseModel], str]]:
    """Every (model, field) of `model` and the models inside it whose type admits a string."""
    found: set[tuple[type[BaseModel], str]] = set()
    for name, info in model.model_fields.items():
        if str in _types_in(info.annotation):
            owner = next(c for c in model.__mro__ if name in getattr(c, "__annotations__", {}))
            found.add((owner, name))
        for inner in _types_in(info.annotation):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                found |= _text_fields(inner)
    return found


def _types_in(annotation: Any) -> list[Any]:
    """The types an annotation is made of (a Literal's values are not types)."""
    if typing.get_origin(annotation) is typing.Literal:
        return []
    return [annotation, *(t for arg in typing.get_args(annotation) for t in _types_in(arg))]


def test_every_text_field_of_every_request_is_in_the_table():
    """GIVEN the request schemas WHEN their fields that take text are listed THEN each has a
    case above (the check itself covers new fields; this keeps their params tested)."""
    covered = {(owner, field) for _, owner, field, _, _ in NOT_UTF8}
    for schema in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest):
        assert _text_fields(schema) <= covered


def test_a_new_text_field_is_checked_without_being_declared_so():
    """GIVEN a request schema with a field added later, of any shape holding strings WHEN it
    carries an unpaired surrogate THEN it is rejected: the check lives on the base class."""

    class Later(EmbeddingRequest):
        tags: dict[str, list[str]] | None = None

    Later.model_validate({"input": "x", "tags": {"a": ["fine", "ünïcode"]}})
    with pytest.raises(ValidationError) as caught:
        Later.model_validate({"input": "x", "tags": {"a": ["fine", "x" + SURROGATE]}})
    assert caught.value.errors()[0]["loc"] == ("tags",)
    assert "of item a.1" in caught.value.errors()[0]["msg"]


@pytest.mark.parametrize(
    "text",
    ["\x00", "\x01\x02", "\u200b", "\ufeff", "\uffff", "\U0010ffff", "😀" * 100, "a" * 10_000],
)
def test_text_that_is_valid_utf8_passes_whatever_it_holds(text):
    """GIVEN NUL, control characters, non-characters, astral and very long text WHEN validated
    THEN accepted: they are UTF-8; whether they tokenize is the engine's question."""
    assert CompletionRequest.model_validate({"prompt": text}).prompt_text == text
    assert chat(messages=[{"role": "user", "content": text}]).messages[0].text() == text


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("ok", None),
        ("é\udc80", "unpaired surrogate U+DC80 at character 1"),
        (["a", {"k": ("b", "\ud83d")}], "unpaired surrogate U+D83D at character 0 of item 1.k.1"),
        ("\ud83d\ude00", "unpaired surrogate U+D83D at character 0"),  # a pair, but not joined
        (42, None),
    ],
)
def test_not_utf8_says_where(value, problem):
    """GIVEN values as json.loads makes them WHEN checked THEN the first surrogate is located."""
    assert not_utf8(value) == problem
