"""GIVEN the real model on either engine WHEN the official client asks for tool calls,
structured outputs, logprobs or several choices THEN the answers follow OpenAI's shapes and
the constraints hold: calls name allowed functions with arguments valid against their schema,
structured answers validate, and the same requests work through Lambda events."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from handler.aws_lambda.app import LambdaApp
from handler.aws_lambda.streaming import DELIMITER
from tests.conftest import FakeContext, http_app, load_event
from tests.integration.test_slot_engine import slot_settings, started

pytestmark = pytest.mark.integration

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time of a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 40}},
            "required": ["timezone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME["function"]["parameters"]}


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population: int = Field(ge=0)


@pytest.fixture(scope="module", params=["llama", "llama-server"])
def engine_kind(request, engine):
    if request.param == "llama":
        yield engine
        return
    slots = started(slot_settings())
    yield slots
    slots.close()


@pytest.fixture(scope="module")
def http(engine_kind):
    return TestClient(http_app(engine_kind))


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0
    )


def check_call(call, allowed=("get_weather", "get_time")):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in allowed
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# ----------------------------------------------------------------- tools


def test_required_returns_calls_valid_against_the_schema(client):
    answer = client.chat.completions.create(
        model="m",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=120,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        check_call(call, ("get_weather",))


def test_a_named_choice_calls_that_function_once(client):
    answer = client.chat.completions.create(
        model="m",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=80,
    )
    [call] = answer.choices[0].message.tool_calls
    check_call(call, ("get_time",))
    assert answer.choices[0].finish_reason == "tool_calls"


def test_streamed_tool_deltas_rebuild_the_buffered_calls(client):
    body = dict(
        model="m",
        messages=ASK,
        tools=[WEATHER],
        parallel_tool_calls=False,
        tool_choice="required",
        temperature=0,
        max_tokens=80,
    )
    buffered = client.chat.completions.create(**body).choices[0].message.tool_calls
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**body, stream=True):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            if delta.id is not None:  # the first delta of a call: id, type and name
                assert delta.type == "function" and delta.function.name
                calls[delta.index] = {"name": delta.function.name, "arguments": ""}
            calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in buffered
    ]


def test_a_tool_result_round_trip_answers_in_text(client):
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    answer = client.chat.completions.create(
        model="m",
        messages=history,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=24,
    )
    assert answer.choices[0].message.content
    assert not answer.choices[0].message.tool_calls


def test_auto_answers_text_or_valid_calls(client):
    answer = client.chat.completions.create(
        model="m", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=40
    )
    message = answer.choices[0].message
    if message.tool_calls:
        for call in message.tool_calls:
            check_call(call, ("get_weather",))
    else:
        assert message.content and not message.content.lstrip().startswith("<tool_call>")


# ----------------------------------------------------------------- structured outputs


def test_parse_with_a_pydantic_model_gives_the_typed_object(client):
    answer = client.chat.completions.parse(
        model="m",
        messages=[{"role": "user", "content": "Describe the city of Lyon."}],
        response_format=City,
        temperature=0,
        max_tokens=120,
    )
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(answer.choices[0].message.parsed, City)


@pytest.mark.parametrize(
    ("form", "sampling"),
    [
        ("nested", {"temperature": 0.8, "seed": 3}),
        ("top-level", {"temperature": 0.8, "seed": 3}),
        ("nested", {"temperature": 0, "presence_penalty": 0.5}),  # a chain with history
    ],
)
def test_json_schema_answers_validate_in_either_form(http, form, sampling):
    schema = City.model_json_schema()
    response_format = (
        {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
        if form == "nested"
        else {"type": "json_object", "schema": schema}
    )
    body = {
        "messages": [{"role": "user", "content": "A city, please."}],
        "response_format": response_format,
        **sampling,
        "max_tokens": 120,
    }
    answer = http.post("/v1/chat/completions", json=body).json()
    assert answer["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), schema)


def test_json_object_gives_an_object_and_truncation_says_length(http):
    body = {
        "messages": [{"role": "user", "content": "Some JSON about cats."}],
        "response_format": {"type": "json_object"},
        "temperature": 0,
    }
    whole = http.post("/v1/chat/completions", json={**body, "max_tokens": 200}).json()
    if whole["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(whole["choices"][0]["message"]["content"]), dict)
    cut = http.post("/v1/chat/completions", json={**body, "max_tokens": 3}).json()
    assert cut["choices"][0]["finish_reason"] == "length"


# ----------------------------------------------------------------- logprobs and choices


def test_chat_logprobs_match_the_text_buffered_and_streamed(client):
    body = dict(model="m", messages=ASK, logprobs=True, top_logprobs=3, temperature=0, max_tokens=8)
    answer = client.chat.completions.create(**body).choices[0]
    content = answer.logprobs.content
    assert "".join(t.token for t in content) == answer.message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.logprob - 1e-6
        assert bytes(token.bytes).decode("utf-8", "replace") == token.token
    streamed = [
        t
        for chunk in client.chat.completions.create(**body, stream=True)
        if chunk.choices and chunk.choices[0].logprobs
        for t in chunk.choices[0].logprobs.content
    ]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-3)


def test_completion_logprobs_have_openai_legacy_shape(client):
    choice = client.completions.create(
        model="m", prompt="The capital of France is", logprobs=2, max_tokens=5, temperature=0
    ).choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0


def test_n_choices_share_the_request_and_usage_counts_the_prompt_once(client):
    answer = client.chat.completions.create(
        model="m", messages=ASK, n=3, temperature=1.0, seed=11, max_tokens=6
    )
    assert [c.index for c in answer.choices] == [0, 1, 2]
    single = client.chat.completions.create(model="m", messages=ASK, max_tokens=6)
    assert answer.usage.prompt_tokens == single.usage.prompt_tokens
    assert answer.usage.completion_tokens <= 3 * 6
    seen = {
        chunk.choices[0].index
        for chunk in client.chat.completions.create(
            model="m", messages=ASK, n=2, max_tokens=4, stream=True
        )
        if chunk.choices
    }
    assert seen == {0, 1}


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
            "messages.1.tool_call_id",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^a+$"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {
                "tools": [
                    {
                        **WEATHER,
                        "function": {
                            **WEATHER["function"],
                            "parameters": {"type": "object", "not": {}},
                        },
                    }
                ]
            },
            "tools.0.function.parameters",
        ),
        ({"n": 1000}, "n"),
        ({"logprobs": False, "top_logprobs": 2}, None),
    ],
)
def test_requests_we_cannot_honour_are_400s_with_the_param(http, fields, param):
    response = http.post("/v1/chat/completions", json={"messages": ASK, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


# ----------------------------------------------------------------- Lambda events


class Sink:
    def __init__(self):
        self.chunks: list[bytes] = []
        self.closed_with = None

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def close(self, error=None) -> None:
        self.closed_with = error


def test_tools_and_structured_outputs_through_lambda_events(engine_kind):
    app = LambdaApp(engine_kind, engine_kind.settings)
    answer = app(load_event("function-url-chat-tools.json"), FakeContext())
    assert answer["statusCode"] == 200
    [call] = json.loads(answer["body"])["choices"][0]["message"]["tool_calls"][:1]
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER_PARAMETERS)
    direct = app(load_event("direct-chat-structured.json"), FakeContext())
    schema = load_event("direct-chat-structured.json")["response_format"]["json_schema"]["schema"]
    assert direct["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(direct["choices"][0]["message"]["content"]), schema)


def test_tool_deltas_through_lambda_response_streaming(engine_kind):
    app = LambdaApp(engine_kind, engine_kind.settings)
    sink = Sink()
    loop = asyncio.new_event_loop()
    try:
        app.stream(
            load_event("function-url-chat-tools-stream.json"), FakeContext(), lambda: sink, loop
        )
    finally:
        loop.close()
    body = b"".join(sink.chunks[1:]).decode()
    assert sink.chunks[0].endswith(DELIMITER)
    chunks = [
        json.loads(line.removeprefix("data: "))
        for line in body.split("\n\n")
        if line.startswith("data: {")
    ]
    assert chunks.pop()["usage"]["completion_tokens"] > 0  # stream_options.include_usage
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"]
    arguments = "".join(d["function"]["arguments"] for d in deltas if d["index"] == 0)
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
