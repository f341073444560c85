"""GIVEN a chat request's tools, tool_choice and response_format WHEN planned, rendered and
parsed THEN the prompt, the grammar and the answer follow OpenAI's rules (no model needed)."""

from __future__ import annotations

import json

import pytest

from handler.errors import InvalidRequest
from handler.service.schemas import ChatCompletionRequest
from handler.service.tools import (
    CALL_CLOSE,
    CALL_OPEN,
    CallArguments,
    CallStart,
    Content,
    ToolCallParser,
    constraints,
    prompt_messages,
    tool_plan,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def request(**fields):
    return ChatCompletionRequest.model_validate({"messages": ASK, **fields})


def call_text(name, arguments):
    return CALL_OPEN + json.dumps({"name": name, "arguments": arguments}) + CALL_CLOSE


# ----------------------------------------------------------------- plans and grammars


@pytest.mark.parametrize(
    ("choice", "mode", "allowed"),
    [
        (None, "auto", ("get_weather", "get_time")),
        ("auto", "auto", ("get_weather", "get_time")),
        ("required", "required", ("get_weather", "get_time")),
        ({"type": "function", "function": {"name": "get_time"}}, "named", ("get_time",)),
    ],
)
def test_tool_choice_sets_the_mode_and_the_allowed_functions(choice, mode, allowed):
    plan = tool_plan(request(tools=[WEATHER, TIME], tool_choice=choice))
    assert plan is not None
    assert (plan.mode, plan.allowed) == (mode, allowed)


def test_none_and_no_tools_mean_a_text_answer():
    assert tool_plan(request(tools=[WEATHER], tool_choice="none")) is None
    assert tool_plan(request()) is None
    assert constraints(request(tools=[WEATHER], tool_choice="none")).grammar is None


def test_a_named_choice_is_never_parallel_and_parallel_can_be_turned_off():
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert not tool_plan(request(tools=[WEATHER], tool_choice=named)).parallel
    assert tool_plan(request(tools=[WEATHER])).parallel
    assert not tool_plan(request(tools=[WEATHER], parallel_tool_calls=False)).parallel


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {
                "tools": [
                    {
                        **WEATHER,
                        "function": {
                            **WEATHER["function"],
                            "parameters": {
                                "type": "object",
                                "properties": {"zip": {"type": "string", "pattern": "^[0-9]+$"}},
                            },
                        },
                    }
                ]
            },
            "tools.0.function.parameters",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "strict": True,
                        "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
                    },
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_object",
                    "schema": {"type": "string", "format": "email"},
                }
            },
            "response_format.schema",
        ),
    ],
)
def test_bad_tools_and_formats_are_400s_naming_the_field(fields, param):
    with pytest.raises(InvalidRequest) as caught:
        constraints(request(**fields))
    assert caught.value.param == param


def test_required_forces_calls_and_auto_also_allows_text():
    required = constraints(request(tools=[WEATHER], tool_choice="required")).grammar
    auto = constraints(request(tools=[WEATHER])).grammar
    assert required is not None and auto is not None
    assert json.dumps("get_weather")[1:-1] in required
    assert "text" not in required.split("\n")[0]
    assert "text" in auto.split("\n")[0]


def test_response_format_alone_compiles_the_schema_and_json_object_any_object():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    nested = constraints(
        request(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        )
    )
    top_level = constraints(request(response_format={"type": "json_object", "schema": schema}))
    any_object = constraints(request(response_format={"type": "json_object"}))
    assert nested.grammar == top_level.grammar and nested.plan is None
    assert any_object.grammar and any_object.grammar != nested.grammar
    assert constraints(request(response_format={"type": "text"})).grammar is None


# ----------------------------------------------------------------- prompts


def test_a_template_without_tools_gets_them_in_a_system_message():
    plan = tool_plan(request(tools=[WEATHER], tool_choice="required"))
    messages = prompt_messages(request(tools=[WEATHER]).messages, plan, template_takes_tools=False)
    assert messages[0]["role"] == "system"
    assert "get_weather" in messages[0]["content"] and CALL_OPEN in messages[0]["content"]
    assert "must call" in messages[0]["content"]
    assert messages[1:] == ASK


def test_an_existing_system_message_is_extended_not_replaced():
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "system", "content": "Be brief."}, *ASK], "tools": [WEATHER]}
    )
    messages = prompt_messages(req.messages, tool_plan(req), template_takes_tools=False)
    assert messages[0]["content"].startswith("Be brief.\n\n")
    assert len(messages) == 2


HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
]


def test_history_renders_calls_and_results_for_either_kind_of_template():
    req = ChatCompletionRequest.model_validate({"messages": HISTORY, "tools": [WEATHER]})
    generic = prompt_messages(req.messages, None, template_takes_tools=False)
    assert generic[1] == {
        "role": "assistant",
        "content": call_text("get_weather", {"city": "Paris"}),
    }
    assert generic[2]["role"] == "user" and "18 C" in generic[2]["content"]
    native = prompt_messages(req.messages, None, template_takes_tools=True)
    assert native[1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    assert native[2] == {
        "role": "tool",
        "content": "18 C",
        "tool_call_id": "call_1",
        "name": "get_weather",
    }


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (
            [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}],
            "messages.1.tool_call_id",
        ),
        (
            [
                *ASK,
                {
                    **HISTORY[1],
                    "tool_calls": [
                        {
                            **HISTORY[1]["tool_calls"][0],
                            "function": {"name": "get_weather", "arguments": "{not json"},
                        }
                    ],
                },
            ],
            "messages.1.tool_calls.0.function.arguments",
        ),
        (
            [
                *ASK,
                {
                    **HISTORY[1],
                    "tool_calls": [
                        {
                            **HISTORY[1]["tool_calls"][0],
                            "function": {"name": "get_weather", "arguments": "[1, 2]"},
                        }
                    ],
                },
            ],
            "messages.1.tool_calls.0.function.arguments",
        ),
    ],
)
def test_a_result_without_its_call_or_malformed_arguments_is_a_400(messages, param):
    req = ChatCompletionRequest.model_validate({"messages": messages})
    with pytest.raises(InvalidRequest) as caught:
        prompt_messages(req.messages, None, template_takes_tools=False)
    assert caught.value.param == param


def test_a_tool_message_needs_its_call_id():
    with pytest.raises(ValueError, match="tool_call_id"):
        ChatCompletionRequest.model_validate({"messages": [*ASK, {"role": "tool", "content": "x"}]})


# ----------------------------------------------------------------- the answer


def feed_all(parser, text, size):
    events = []
    for i in range(0, len(text), size):
        events += parser.feed(text[i : i + size])
    return events + parser.finish()


def arguments_of(events):
    calls = {}
    for e in events:
        if isinstance(e, CallStart):
            calls[e.index] = [e.name, ""]
        elif isinstance(e, CallArguments):
            calls[e.index][1] += e.text
    return {i: (n, json.loads(a)) for i, (n, a) in calls.items()}


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_calls_parse_the_same_however_the_text_is_cut(size):
    text = call_text("get_weather", {"city": 'Pa"r{is}'}) + "\n" + call_text("get_time", {})
    parser = ToolCallParser(calls_allowed=True)
    events = feed_all(parser, text, size)
    assert arguments_of(events) == {0: ("get_weather", {"city": 'Pa"r{is}'}), 1: ("get_time", {})}
    assert [(n, json.loads(a)) for _, n, a in parser.calls] == [
        ("get_weather", {"city": 'Pa"r{is}'}),
        ("get_time", {}),
    ]
    assert parser.called and not parser.repeated and parser.content == ""


def test_the_first_call_streams_before_it_is_complete():
    parser = ToolCallParser(calls_allowed=True)
    events = parser.feed(CALL_OPEN + '{"name": "get_weather", "arguments": {"ci')
    assert events == [CallStart(0, events[0].id, "get_weather"), CallArguments(0, '{"ci')]
    assert events[0].id.startswith("call_")


def test_a_repeated_call_is_dropped_and_stops_the_answer():
    one = call_text("get_weather", {"city": "Paris"})
    parser = ToolCallParser(calls_allowed=True)
    events = feed_all(parser, f"{one}\n{one}\n{one}", 5)
    assert len(parser.calls) == 1 and parser.repeated
    assert len([e for e in events if isinstance(e, CallStart)]) == 1


def test_a_later_call_cut_short_is_dropped_but_the_first_stays_truncated():
    first = call_text("get_weather", {"city": "Paris"})
    parser = ToolCallParser(calls_allowed=True)
    feed_all(parser, first + "\n" + first[:-20], 4)
    assert [json.loads(a) for _, _, a in parser.calls] == [{"city": "Paris"}]
    truncated = ToolCallParser(calls_allowed=True)
    feed_all(truncated, first[:-17], 4)
    assert truncated.calls[0][2] == '{"city": "Par'


def test_text_is_content_and_a_call_tag_in_text_is_not_a_call_when_calls_are_off():
    auto = ToolCallParser(calls_allowed=True)
    assert feed_all(auto, "Sunny, I think.", 3) == [
        Content("Sun"),
        Content("ny,"),
        Content(" I "),
        Content("thi"),
        Content("nk."),
    ]
    off = ToolCallParser(calls_allowed=False)
    text = call_text("get_weather", {"city": "Paris"})
    assert "".join(e.text for e in feed_all(off, text, 4)) == text
    assert not off.called


def test_a_prefix_of_the_tag_is_held_until_it_is_decided():
    parser = ToolCallParser(calls_allowed=True)
    assert parser.feed("<tool") == []
    assert parser.feed("box>") == [Content("<toolbox>")]


def test_what_the_grammar_forces_is_prefilled_and_parsed_as_the_answer():
    named = {"type": "function", "function": {"name": "get_time"}}
    one = constraints(request(tools=[WEATHER, TIME], tool_choice=named))
    assert one.prefill == CALL_OPEN + '{"name": "get_time", "arguments": '
    many = constraints(request(tools=[WEATHER, TIME], tool_choice="required"))
    assert many.prefill == CALL_OPEN + "{"
    assert constraints(request(tools=[WEATHER])).prefill == ""  # auto: the model decides
    parser = ToolCallParser(calls_allowed=True)
    events = parser.feed(one.prefill)
    assert [type(e) for e in events] == [CallStart] and events[0].name == "get_time"
    parser.feed('{"timezone": "UTC"}}' + CALL_CLOSE)
    assert [(n, a) for _, n, a in parser.calls] == [("get_time", '{"timezone": "UTC"}')]
