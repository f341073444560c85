"""GIVEN Responses API requests and chat answers WHEN translated both ways THEN the chat request
is the one OpenAI's documented shapes call for, and the response objects and stream events parse
as the official openai client's types."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from handler.errors import APIError, InvalidRequest
from handler.service.chunk_stream import ChunkStream
from handler.service.responses import (
    ResponsesRequest,
    is_responses_payload,
    responses_param,
    to_chat,
)
from handler.service.responses_output import ResponseEvents, from_chat
from handler.web.http import parse_body, sse_lines
from handler.web.routes import ROUTES, direct_route
from tests.conftest import load_event

EVENT = TypeAdapter(ResponseStreamEvent)


def request(**fields: Any) -> ResponsesRequest:
    return parse_body(ResponsesRequest, {"input": "hi", **fields})


def rejected(**fields: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        to_chat(request(**fields))
    return info.value


def completion(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice]}


USAGE_CHUNK = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}


def streamed(req: ResponsesRequest, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    chat = ChunkStream(iter(chunks), lambda: None, lambda: None)
    return list(ResponseEvents(req, "m", chat))


# ------------------------------------------------------------------ the request


def test_string_input_is_one_user_message_after_the_instructions():
    chat = to_chat(request(instructions="Be brief.", max_output_tokens=9, temperature=0))
    assert [m.model_dump(exclude_none=True) for m in chat.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert chat.token_limit == 9
    assert chat.temperature == 0
    assert chat.stream is False


def test_items_become_messages_and_function_calls_join_their_assistant_turn():
    req = request(
        input=[
            {"role": "developer", "content": [{"type": "input_text", "text": "Use tools."}]},
            {"type": "message", "role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": "noon"},
        ]
    )
    messages = [m.model_dump(exclude_none=True) for m in to_chat(req).messages]
    assert [m["role"] for m in messages] == ["developer", "user", "assistant", "tool", "tool"]
    assert messages[2]["content"] == "Checking."
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"]
    assert messages[2]["tool_calls"][0]["function"] == {"name": "weather", "arguments": "{}"}
    assert messages[3] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}


def test_a_function_call_with_no_assistant_turn_before_it_gets_one():
    req = request(
        input=[
            {"role": "user", "content": "Weather?"},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ]
    )
    assistant = to_chat(req).messages[1]
    assert assistant.role == "assistant"
    assert not assistant.content
    assert assistant.tool_calls[0].id == "c1"


def test_function_tools_tool_choice_and_text_format_take_the_chat_shapes():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tool = {"type": "function", "name": "weather", "description": "d", "parameters": schema}
    chat = to_chat(
        request(
            tools=[{**tool, "strict": True}],
            tool_choice={"type": "function", "name": "weather"},
            parallel_tool_calls=False,
        )
    ).model_dump(exclude_none=True, by_alias=True)
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "d",
                "parameters": schema,
                "strict": True,
            },
        }
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["parallel_tool_calls"] is False
    assert to_chat(request(tools=[tool], tool_choice="required")).tool_choice == "required"
    fmt = {"type": "json_schema", "name": "city", "schema": schema, "strict": True}
    formatted = to_chat(request(text={"format": fmt})).model_dump(exclude_none=True, by_alias=True)
    assert formatted["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": schema, "strict": True},
    }
    as_object = to_chat(request(text={"format": {"type": "json_object"}})).response_format
    assert as_object.type == "json_object"
    assert to_chat(request(text={"format": {"type": "text"}})).response_format is None


def test_a_stream_asks_the_chat_pipeline_for_usage():
    chat = to_chat(request(stream=True))
    assert chat.stream and chat.include_usage


def test_absent_or_false_store_and_harmless_unknown_fields_are_accepted():
    for fields in ({}, {"store": False}, {"reasoning": {}}, {"truncation": "disabled"}):
        to_chat(request(**fields, service_tier="auto", prompt_cache_key="k", verbosity="x"))
    assert request(metadata={"a": "b"}).metadata == {"a": "b"}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"truncation": "auto"}, "truncation"),
        ({"input": []}, "input"),
        ({"input": 5}, "input"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(fields, param):
    error = rejected(**fields)
    assert error.status == 400
    assert error.param is not None
    assert error.param.startswith(param), error.body()
    assert "Value error" not in error.message


def test_a_message_of_the_400_says_what_is_supported():
    assert "only function tools" in rejected(tools=[{"type": "file_search"}]).message
    assert "keeps no responses" in rejected(store=True).message
    assert "'reasoning'" in rejected(input=[{"type": "reasoning"}]).message


def test_a_chat_parameter_error_names_the_responses_field():
    bad_name = {"type": "function", "name": "has spaces", "parameters": {}}
    assert rejected(tools=[bad_name]).param == "tools.0.name"
    assert responses_param("messages.2.tool_calls.0.function.arguments") == "input"
    assert responses_param("response_format") == "text.format"
    assert responses_param("max_tokens") == "max_output_tokens"
    assert responses_param(None) is None


# ------------------------------------------------------------------ the response


def test_a_text_answer_is_a_response_the_client_parses():
    req = request(instructions="Be brief.", metadata={"k": "v"}, temperature=0)
    body = from_chat(req, completion({"role": "assistant", "content": "Paris"}))
    response = Response.model_validate(body)
    assert response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.output_text == "Paris"
    assert response.output[0].id.startswith("msg_")
    assert response.usage.input_tokens == 7
    assert response.usage.total_tokens == 10
    assert response.instructions == "Be brief."
    assert response.metadata == {"k": "v"}
    assert response.temperature == 0
    assert response.incomplete_details is None
    assert response.text.format.type == "text"


def test_an_answer_cut_at_its_limit_is_incomplete():
    body = from_chat(request(max_output_tokens=2), completion({"content": "Par"}, "length"))
    response = Response.model_validate(body)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    assert response.max_output_tokens == 2


def test_tool_calls_are_function_call_items():
    tool = {"type": "function", "name": "weather", "parameters": {"type": "object"}}
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "weather", "arguments": '{"city":"Paris"}'}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    req = request(tools=[tool], tool_choice="required")
    response = Response.model_validate(from_chat(req, completion(message, "tool_calls")))
    assert response.status == "completed"
    [item] = response.output
    assert item.type == "function_call"
    assert item.id.startswith("fc_")
    assert (item.call_id, item.name, item.arguments) == ("call_1", "weather", '{"city":"Paris"}')
    assert response.tools[0].name == "weather"
    assert response.tool_choice == "required"


def test_a_tool_call_cut_at_the_limit_is_the_incomplete_item():
    first = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    cut = {"id": "c2", "type": "function", "function": {"name": "f", "arguments": '{"'}}
    message = {"role": "assistant", "content": None, "tool_calls": [first, cut]}
    response = Response.model_validate(from_chat(request(), completion(message, "length")))
    assert response.status == "incomplete"
    assert [i.status for i in response.output] == ["completed", "incomplete"]
    chunks = [chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f"}}]})]
    events = streamed(request(stream=True), [*chunks, chunk({}, "length")])
    last = EVENT.validate_python(events[-1])
    assert last.type == "response.incomplete"
    assert last.response.output[0].status == "incomplete"


def test_logprobs_are_the_output_texts():
    choice_logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}]}
    body = completion({"content": "Hi"})
    body["choices"][0]["logprobs"] = choice_logprobs
    response = Response.model_validate(from_chat(request(top_logprobs=0), body))
    assert response.output[0].content[0].logprobs[0].logprob == -0.1


def test_a_json_schema_format_is_echoed_as_sent():
    fmt = {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}
    body = from_chat(request(text={"format": fmt}), completion({"content": "{}"}))
    assert body["text"] == {"format": fmt}
    assert Response.model_validate(body).text.format.schema_ == {"type": "object"}


# ------------------------------------------------------------------ the stream


def test_a_text_stream_is_openais_event_sequence():
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Par"}),
        chunk({"content": "is"}),
        chunk({}, "stop"),
        USAGE_CHUNK,
    ]
    events = streamed(request(stream=True), chunks)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    parsed = [EVENT.validate_python(e) for e in events]
    assert parsed[0].response.status == "in_progress"
    assert parsed[0].response.output == []
    assert parsed[6].text == "Paris"
    final = parsed[-1].response
    assert final.output_text == "Paris"
    assert final.id == parsed[0].response.id
    assert final.output[0].id == parsed[2].item.id == parsed[4].item_id
    assert final.usage.output_tokens == 3


def test_a_stream_cut_at_its_limit_ends_incomplete():
    events = streamed(request(stream=True), [chunk({"content": "Pa"}), chunk({}, "length")])
    last = EVENT.validate_python(events[-1])
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output[0].status == "incomplete"


def test_an_empty_answer_still_streams_one_message():
    events = streamed(request(stream=True), [chunk({"role": "assistant", "content": ""})])
    assert [e["type"] for e in events][2:5] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
    ]
    assert EVENT.validate_python(events[-1]).response.output_text == ""


def test_streamed_tool_calls_are_function_call_items_with_argument_deltas():
    def call(index, fields):
        return chunk({"tool_calls": [{"index": index, **fields}]})

    chunks = [
        chunk({"role": "assistant", "content": ""}),
        call(0, {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}),
        call(0, {"function": {"arguments": '{"x":'}}),
        call(0, {"function": {"arguments": "1}"}}),
        call(1, {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}),
        chunk({}, "tool_calls"),
    ]
    events = streamed(request(stream=True), chunks)
    types = [e["type"] for e in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    parsed = [EVENT.validate_python(e) for e in events]
    assert parsed[5].arguments == '{"x":1}'
    assert parsed[7].output_index == 1
    final = parsed[-1].response
    assert [(i.call_id, i.name, i.arguments) for i in final.output] == [
        ("call_a", "f", '{"x":1}'),
        ("call_b", "g", "{}"),
    ]
    assert final.status == "completed"


def test_text_then_a_tool_call_closes_the_message_first():
    chunks = [
        chunk({"content": "Let me check."}),
        chunk(
            {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": ""}}]}
        ),
        chunk({}, "tool_calls"),
    ]
    events = streamed(request(stream=True), chunks)
    final = EVENT.validate_python(events[-1]).response
    assert [i.type for i in final.output] == ["message", "function_call"]
    assert final.output_text == "Let me check."


# ------------------------------------------------------------------ SSE and routing


def sse(events_text: str) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for block in events_text.strip().split("\n\n"):
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        found.append((name[len("event: ") :], json.loads(data[len("data: ") :])))
    return found


def test_named_sse_events_and_no_done():
    chat = ChunkStream(iter([chunk({"content": "Hi"}), chunk({}, "stop")]), lambda: None, str)
    text = "".join(sse_lines(ResponseEvents(request(stream=True), "m", chat)))
    assert "[DONE]" not in text
    found = sse(text)
    assert all(name == data["type"] for name, data in found)
    assert found[-1][0] == "response.completed"


def test_an_error_mid_stream_is_an_error_event_with_the_next_sequence_number():
    def failing():
        yield chunk({"content": "Hi"})
        raise APIError("engine went away", code="engine_failed", status=500)

    chat = ChunkStream(failing(), lambda: None, lambda: None)
    found = sse("".join(sse_lines(ResponseEvents(request(stream=True), "m", chat))))
    name, error = found[-1]
    assert name == "error"
    assert error["sequence_number"] == found[-2][1]["sequence_number"] + 1
    parsed = EVENT.validate_python(error)
    assert (parsed.code, parsed.message) == ("engine_failed", "engine went away")


def test_closing_the_events_closes_the_chat_stream():
    closed = []
    chat = ChunkStream(iter([chunk({"content": "Hi"})]), lambda: closed.append("released"), str)
    events = ResponseEvents(request(stream=True), "m", chat)
    next(events)
    events.close()
    assert closed


def test_chat_sse_is_unchanged():
    chat = ChunkStream(iter([chunk({"content": "Hi"})]), lambda: None, lambda: None)
    lines = list(sse_lines(chat))
    assert lines[0].startswith("data: {") and lines[-1] == "data: [DONE]\n\n"


def test_direct_invokes_tell_responses_from_embeddings():
    assert direct_route(load_event("direct-embedding.json")).name == "embeddings"
    assert direct_route({"input": "cold starts"}).name == "embeddings"
    assert direct_route({"input": "hi", "model": "m", "dimensions": 3}).name == "embeddings"
    assert direct_route(load_event("direct-response.json")).name == "responses"
    assert direct_route({"input": [{"role": "user", "content": "hi"}]}).name == "responses"
    assert direct_route({"input": "hi", "instructions": "Be brief."}).name == "responses"
    assert direct_route({"input": "hi", "max_output_tokens": 5}).name == "responses"
    assert direct_route({"messages": []}).name == "chat_completions"
    # Shared generation fields keep their old meaning: any payload with input was embeddings'.
    assert not is_responses_payload({"input": "hi", "temperature": 0, "max_tokens": 4})
    assert is_responses_payload({"input": "hi", "text": {"format": {"type": "text"}}})


def test_the_route_is_in_the_table():
    [route] = [r for r in ROUTES if r.path == "/v1/responses"]
    assert route.method == "POST" and route.generates and route.schema is ResponsesRequest


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": "a\ud800"}, "input.0.message.content.0.text"),
        ({"instructions": "\ud800"}, "instructions"),
        ({"tools": [{"type": "function", "name": "f", "description": "\udc00"}]}, "tools.0"),
    ],
)
def test_text_that_is_not_utf8_is_a_400_naming_the_field(fields, param):
    with pytest.raises(InvalidRequest) as info:
        request(**fields)
    assert info.value.param.startswith(param)
    assert "UTF-8" in info.value.message
