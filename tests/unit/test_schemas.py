"""GIVEN OpenAI request bodies WHEN validated THEN accepted or rejected as OpenAI would."""

from __future__ import annotations

import base64
import struct

import pytest
from pydantic import ValidationError

from handler.service.objects import encode_embedding
from handler.service.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest


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
        {"n": 2},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": [""]},
        {"logprobs": True},
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
