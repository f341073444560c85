"""GIVEN the HTTP server on the real model, with either engine, WHEN the libraries people point at
an OpenAI base URL call it (instructor, langchain-openai, pydantic-ai, openai-agents, the `llm`
CLI, the openai client's helpers) THEN each gets what it asked for: a typed object, a tool call
valid against the tool's schema, or text.

With the 135M default model only constrained decoding makes the structured cases pass: that is
what these tests prove."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.integration.servers import http_server
from tests.integration.test_slot_engine import slot_env

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct.Q4_1"
QUESTION = "Which city is the capital of France? Give its country and population."
TEXT_QUESTION = "Name the capital of France in one word."
WEATHER_QUESTION = "What is the weather in Paris, in celsius?"
MAX_TOKENS = 128
ENGINES = {"in-process": dict, "llama-server": slot_env}
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": WEATHER_PARAMETERS,
    },
}


class City(BaseModel):
    name: str
    country: str
    population: int


def assert_city(value: object) -> None:
    assert isinstance(value, City), value
    assert isinstance(value.name, str)
    assert isinstance(value.country, str)
    assert isinstance(value.population, int)


def assert_arguments(arguments: str | dict, schema: dict) -> None:
    """Tool arguments as the model wrote them: JSON (when a string) valid against `schema`."""
    parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(parsed, schema)


@pytest.fixture(scope="module", params=list(ENGINES))
def base_url(request):
    with http_server(ENGINES[request.param]()) as base:
        yield base + "/v1"


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


# --- instructor


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_gives_the_response_model(client, mode):
    import instructor

    patched = instructor.from_openai(client, mode=getattr(instructor.Mode, mode))
    city = patched.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        response_model=City,
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )
    assert_city(city)


# --- langchain-openai


@pytest.fixture(scope="module")
def chat_openai(base_url):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=MODEL,
        base_url=base_url,
        api_key="unused",
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )


def test_langchain_structured_output_default_method(chat_openai):
    assert_city(chat_openai.with_structured_output(City).invoke(QUESTION))


def test_langchain_bind_tools_with_a_named_choice(chat_openai):
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool

    @tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """The current weather in a city."""
        return "sunny"

    message = chat_openai.bind_tools([get_weather], tool_choice="get_weather").invoke(
        WEATHER_QUESTION
    )
    schema = convert_to_openai_tool(get_weather)["function"]["parameters"]
    # Arguments that are not JSON would land in invalid_tool_calls.
    assert message.invalid_tool_calls == []
    [call] = message.tool_calls
    assert call["name"] == "get_weather"
    assert_arguments(call["args"], schema)


def test_langchain_invoke_and_stream_give_text(chat_openai):
    assert chat_openai.invoke(TEXT_QUESTION).content.strip()
    chunks = list(chat_openai.stream(TEXT_QUESTION))
    assert len(chunks) > 1
    assert "".join(chunk.content for chunk in chunks).strip()


# --- pydantic-ai


def run_pydantic_ai(base_url, kind, question, **agent_kwargs):
    """An agent's output, on a client closed when the run ends."""
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    model_class = {"chat": OpenAIChatModel, "responses": OpenAIResponsesModel}[kind]

    async def run():
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as c:
            model = model_class(MODEL, provider=OpenAIProvider(openai_client=c))
            settings = ModelSettings(temperature=0, max_tokens=MAX_TOKENS)
            agent = Agent(model, model_settings=settings, **agent_kwargs)
            return (await agent.run(question)).output

    return asyncio.run(run())


def test_pydantic_ai_openai_prefix_picks_the_responses_model():
    from pydantic_ai.models import infer_model
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    model = infer_model(f"openai:{MODEL}", provider_factory=lambda _name: provider)
    # Both classes are driven below; this records which one users of the prefix get.
    assert isinstance(model, OpenAIResponsesModel)


@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_pydantic_ai_agent_answers_text(base_url, kind):
    output = run_pydantic_ai(base_url, kind, TEXT_QUESTION)
    assert isinstance(output, str)
    assert output.strip()


@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_pydantic_ai_agent_gives_the_output_type(base_url, kind):
    # retries=0: no second chance, the first answer must validate.
    assert_city(run_pydantic_ai(base_url, kind, QUESTION, output_type=City, retries=0))


# --- openai-agents (the Agents SDK)


def run_agent(base_url, kind, question, model_settings=None, **agent_kwargs):
    """An Agents SDK run's final output, on a client closed when the run ends."""
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    model_class = {"chat": OpenAIChatCompletionsModel, "responses": OpenAIResponsesModel}[kind]
    settings = ModelSettings(temperature=0, max_tokens=MAX_TOKENS, **(model_settings or {}))

    async def run():
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as c:
            agent = Agent(
                name="assistant",
                instructions="You are a concise assistant.",
                model=model_class(model=MODEL, openai_client=c),
                model_settings=settings,
                **agent_kwargs,
            )
            return (await Runner.run(agent, question)).final_output

    return asyncio.run(run())


@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_agents_sdk_answers_text(base_url, kind):
    output = run_agent(base_url, kind, TEXT_QUESTION)
    assert isinstance(output, str)
    assert output.strip()


@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_agents_sdk_gives_the_output_type(base_url, kind):
    assert_city(run_agent(base_url, kind, QUESTION, output_type=City))


@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_agents_sdk_calls_a_named_function_tool(base_url, kind):
    from agents import function_tool

    calls = []

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """The current weather in a city."""
        calls.append({"city": city, "unit": unit})
        return "sunny"

    tool = function_tool(get_weather)
    output = run_agent(
        base_url,
        kind,
        WEATHER_QUESTION,
        tools=[tool],
        tool_use_behavior="stop_on_first_tool",
        model_settings={"tool_choice": "get_weather"},
    )
    assert output == "sunny"
    [arguments] = calls
    assert_arguments(arguments, tool.params_json_schema)


# --- simonw's llm CLI


class LlmCli:
    """The `llm` CLI with an OpenAI-compatible model, `coldstart`, in a temporary LLM_USER_PATH."""

    def __init__(self, base_url: str, user_path: Path) -> None:
        (user_path / "extra-openai-models.yaml").write_text(
            "- model_id: coldstart\n"
            f"  model_name: {MODEL}\n"
            f"  api_base: {base_url}\n"
            "  api_key_name: coldstart\n"
            "  supports_tools: true\n"
            "  supports_schema: true\n"
        )
        (user_path / "keys.json").write_text(json.dumps({"coldstart": "unused"}))
        self.env = {**os.environ, "LLM_USER_PATH": str(user_path)}
        self.binary = str(Path(sys.executable).with_name("llm"))

    def run(self, *args: str) -> str:
        command = [self.binary, *args]
        done = subprocess.run(
            command, check=False, env=self.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def prompt(self, *args: str) -> str:
        options = ["-o", "temperature", "0", "-o", "max_tokens", str(MAX_TOKENS)]
        return self.run("-m", "coldstart", *options, *args)

    def last_conversation(self) -> list[dict]:
        """The responses of the latest conversation, as llm logged them."""
        return json.loads(self.run("logs", "--current", "--json", "-n", "0"))


@pytest.fixture(scope="module")
def llm_cli(base_url, tmp_path_factory):
    return LlmCli(base_url, tmp_path_factory.mktemp("llm"))


def test_llm_cli_prompt_streams_text(llm_cli):
    assert llm_cli.prompt(TEXT_QUESTION).strip()


def test_llm_cli_schema_gives_a_valid_object(llm_cli):
    output = llm_cli.prompt("--schema", "name, country, population int", QUESTION)
    assert_city(City.model_validate_json(output))


def test_llm_cli_functions_answer_in_text_or_valid_calls(llm_cli):
    # llm has no tool_choice: it always sends `auto`, which lets the model answer in text (the
    # 135M model does). Any call it makes, llm runs and answers in the same conversation.
    function = (
        "def get_weather(city: str) -> str:\n"
        "    'The current weather in a city.'\n"
        "    return 'sunny'\n"
    )
    assert llm_cli.prompt("--functions", function, WEATHER_QUESTION).strip()
    responses = llm_cli.last_conversation()
    [tool] = responses[0]["tools"]
    assert tool["name"] == "get_weather"
    for response in responses:
        for call in response["tool_calls"]:
            assert call["name"] == "get_weather"
            assert_arguments(call["arguments"], tool["input_schema"])


# --- the official openai client's helpers


def test_openai_parse_gives_the_pydantic_model(client):
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        response_format=City,
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    assert_city(completion.choices[0].message.parsed)


def test_openai_streamed_tool_call_deltas_assemble_a_valid_call(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": WEATHER_QUESTION}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        stream=True,
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                if delta.function:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
    assert calls
    assert finish == "tool_calls"
    for call in calls.values():
        assert call["id"]
        assert call["name"] == "get_weather"
        assert_arguments(call["arguments"], WEATHER_PARAMETERS)


def test_openai_logprobs_cover_the_answer(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": TEXT_QUESTION}],
        logprobs=True,
        top_logprobs=2,
        temperature=0,
        max_tokens=16,
    )
    choice = completion.choices[0]
    tokens = choice.logprobs.content
    assert tokens
    assert "".join(t.token for t in tokens) == choice.message.content
    for token in tokens:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 2
        # Greedy decoding picks the most likely token.
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-4)


def test_openai_responses_create_and_parse(client):
    response = client.responses.create(
        model=MODEL, input=TEXT_QUESTION, temperature=0, max_output_tokens=MAX_TOKENS
    )
    assert response.output_text.strip()
    parsed = client.responses.parse(
        model=MODEL, input=QUESTION, text_format=City, temperature=0, max_output_tokens=MAX_TOKENS
    )
    assert_city(parsed.output_parsed)


def test_openai_streamed_response_matches_its_final_text(client):
    with client.responses.stream(
        model=MODEL, input=TEXT_QUESTION, temperature=0, max_output_tokens=MAX_TOKENS
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    # get_final_response() needs the stream to end with response.completed (the model has room).
    types = [event.type for event in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas.strip()
    assert deltas == final.output_text
