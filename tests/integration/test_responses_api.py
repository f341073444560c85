"""GIVEN the HTTP server on the real model, with either engine, WHEN the official openai client
calls POST /v1/responses THEN it parses every answer: text, function calls, structured output,
streamed events, the 400s; and the Lambda entry serves the same route (function URL, streamed
and buffered, and a direct invoke)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from openai.types.responses import Response
from pydantic import BaseModel

from handler.aws_lambda.app import LambdaApp
from handler.aws_lambda.streaming import DELIMITER
from tests.conftest import FakeContext, load_event, make_settings
from tests.integration.servers import http_server
from tests.integration.test_slot_engine import slot_env

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct.Q4_1"
INSTRUCTIONS = "You are a concise assistant."
QUESTION = "Name the capital of France in one word."
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
ENGINES = {"in-process": dict, "llama-server": slot_env}


@pytest.fixture(scope="module", params=list(ENGINES))
def base_url(request):
    with http_server(ENGINES[request.param]()) as base:
        yield base


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def test_string_input_with_instructions_answers_as_the_chat_route_does(client):
    response = client.responses.create(
        model=MODEL, instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=16, temperature=0
    )
    assert response.object == "response"
    assert response.id.startswith("resp_")
    assert "Paris" in response.output_text
    assert response.status in ("completed", "incomplete")
    assert response.instructions == INSTRUCTIONS
    assert response.usage.output_tokens >= 1
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": QUESTION},
        ],
        max_tokens=16,
        temperature=0,
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_a_function_call_and_its_output_round_trip_as_the_chat_conversation(client):
    arguments = '{"city": "Paris"}'
    result = '{"temperature_c": 21, "sky": "sunny"}'
    response = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": arguments,
            },
            {"type": "function_call_output", "call_id": "call_1", "output": result},
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=24,
        temperature=0,
    )
    assert response.output[0].type == "message"
    assert response.output_text
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": result},
        ],
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
        tool_choice="none",
        max_tokens=24,
        temperature=0,
    )
    assert response.output_text == chat.choices[0].message.content


def test_streamed_text_is_openais_events_in_order(client):
    kwargs = {"model": MODEL, "instructions": INSTRUCTIONS, "input": QUESTION, "temperature": 0}
    buffered = client.responses.create(**kwargs, max_output_tokens=16)
    events = list(client.responses.create(**kwargs, max_output_tokens=16, stream=True))
    types = [e.type for e in events]
    deltas = types.count("response.output_text.delta")
    assert deltas >= 1
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{buffered.status}",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == buffered.output_text
    final = events[-1].response
    assert final.output_text == text
    assert final.id == events[0].response.id
    assert final.usage.output_tokens == buffered.usage.output_tokens


def test_the_stream_helper_gives_the_final_response(client):
    with client.responses.stream(
        model=MODEL, input=QUESTION, max_output_tokens=8, temperature=0
    ) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == text
    assert final.usage.output_tokens >= 1


def test_max_output_tokens_makes_the_response_incomplete(client):
    response = client.responses.create(
        model=MODEL, input="Tell me a long story.", max_output_tokens=2, temperature=0
    )
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 2
    assert response.max_output_tokens == 2
    events = list(
        client.responses.create(
            model=MODEL, input="Tell me a long story.", max_output_tokens=2, stream=True
        )
    )
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_a_required_tool_is_a_function_call_item(client):
    kwargs = {
        "model": MODEL,
        "input": "What is the weather in Paris?",
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": False,  # else the small model calls on until its limit
        "max_output_tokens": 48,
        "temperature": 0,
    }
    response = client.responses.create(**kwargs)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls, response.output
    assert calls[0].name == "get_weather"
    assert calls[0].id.startswith("fc_") and calls[0].call_id
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    assert response.status == "completed"
    events = list(client.responses.create(**kwargs, stream=True))
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    streamed = [i for i in events[-1].response.output if i.type == "function_call"]
    assert deltas == done.arguments == streamed[0].arguments
    # The chat pipeline's buffered arguments may differ in whitespace from its streamed ones.
    assert json.loads(done.arguments) == json.loads(calls[0].arguments)


class City(BaseModel):
    name: str
    country: str


def test_a_json_schema_format_parses_into_the_model(client):
    parsed = client.responses.parse(
        model=MODEL,
        input="Give the capital of France and its country.",
        text_format=City,
        max_output_tokens=48,
        temperature=0,
    )
    assert isinstance(parsed.output_parsed, City)
    assert parsed.text.format.type == "json_schema"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ],
)
def test_what_needs_a_store_or_a_hosted_tool_is_a_400(client, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="hi", max_output_tokens=4, **fields)
    assert info.value.body["type"] == "invalid_request_error"
    assert info.value.body["param"] == param


def test_an_oversized_input_is_context_length_exceeded_naming_input(base_url):
    answer = httpx.post(
        base_url + "/v1/responses", json={"input": "word " * 2000, "max_output_tokens": 4}
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "context_length_exceeded"
    assert answer.json()["error"]["param"] == "input"


# ------------------------------------------------------------------ the Lambda entry


class Sink:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed_with: object = "open"

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def close(self, error: object = None) -> None:
        self.closed_with = error


def named_events(body: str) -> list[dict]:
    events = []
    for block in body.strip().split("\n\n"):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


@pytest.fixture(scope="module")
def lambda_app(engine):
    return LambdaApp(engine, make_settings())


def test_a_function_url_stream_carries_the_named_events(lambda_app):
    sink = Sink()
    loop = asyncio.new_event_loop()
    try:
        event = load_event("function-url-responses-stream.json")
        lambda_app.stream(event, FakeContext(), lambda: sink, loop)
    finally:
        loop.close()
    prelude, body = sink.chunks[0], b"".join(sink.chunks[1:]).decode()
    metadata = json.loads(prelude.removesuffix(DELIMITER))
    assert metadata["statusCode"] == 200
    assert metadata["headers"]["content-type"].startswith("text/event-stream")
    events = named_events(body)
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    assert "Paris" in Response.model_validate(events[-1]["response"]).output_text
    assert sink.closed_with is None


def test_a_buffered_function_url_and_a_direct_invoke(lambda_app):
    answer = lambda_app(load_event("function-url-responses-stream.json"), FakeContext())
    assert answer["statusCode"] == 200
    assert named_events(answer["body"])[-1]["type"].startswith("response.")
    direct = lambda_app(load_event("direct-response.json"), FakeContext())
    response = Response.model_validate(direct)
    assert "Paris" in response.output_text
    assert response.instructions == INSTRUCTIONS
    embedding = lambda_app(load_event("direct-embedding.json"), FakeContext())
    assert embedding["object"] == "list"
