"""Tools and structured outputs: what a request's `tools`, `tool_choice` and `response_format`
do to its prompt, its grammar and its answer.

A chat template that takes `tools` (Hermes, Qwen, Llama 3.1, ...) renders them itself; for any
other template the tools are described in a system message. Either way the model answers in one
format, enforced by a grammar: tool calls as

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

(the Hermes/Qwen format, one block per call), and anything else as text. `required` and a named
choice allow only calls (of that function), never downgraded to text; `auto` allows text or
calls; `none` leaves the tools out. The arguments follow each function's parameter schema. The
answer is parsed back (`ToolCallParser`, incrementally, so calls stream as OpenAI streams them).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from handler.engine.grammar import (
    JSON_OBJECT_GRAMMAR,
    GrammarBuilder,
    UnsupportedSchema,
    check_strict,
    literal,
    schema_grammar,
)
from handler.errors import InvalidRequest
from handler.service.schemas import ChatCompletionRequest, ChatMessage, ResponseFormat, Tool

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
# Calls in one answer when parallel_tool_calls is on: a bound keeps a small model from looping.
MAX_PARALLEL_CALLS = 4

Mode = Literal["auto", "required", "named"]


@dataclass(frozen=True)
class ToolPlan:
    """How a request's tools shape its prompt and constrain its answer."""

    tools: list[dict[str, Any]]  # OpenAI function tools, as templates take them
    mode: Mode
    allowed: tuple[str, ...]  # names the answer may call
    parallel: bool


@dataclass(frozen=True)
class Constraints:
    """What a chat request adds to generation: the grammar, whether calls are parsed, and the
    start of the answer when the grammar leaves only one (`prefill`: evaluated with the prompt,
    in one batch, instead of decoded token by token; the answer's text begins with it)."""

    grammar: str | None = None
    plan: ToolPlan | None = None
    prefill: str = ""


def constraints(req: ChatCompletionRequest) -> Constraints:
    """The grammar a chat request's tools and response_format make, checked (4xx on bad input;
    needs no model, so it answers while the model loads)."""
    plan = tool_plan(req)
    answer = _answer_rule_source(req.response_format)
    if plan is None:
        if answer is None:
            return Constraints()
        return Constraints(grammar=answer)
    grammar, prefill = _tools_grammar(req, plan)
    return Constraints(grammar=grammar, plan=plan, prefill=prefill)


def tool_plan(req: ChatCompletionRequest) -> ToolPlan | None:
    """The request's tools and choice, validated; None when the answer is text only."""
    choice = req.tool_choice
    tools = req.tools or []
    if not tools:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest(
                "tool_choice requires tools: the request has none", param="tool_choice"
            )
        return None
    names = [t.function.name for t in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise InvalidRequest(f"tools: the function '{duplicate}' is listed twice", param="tools")
    if choice == "none":
        return None
    if choice is None or isinstance(choice, str):
        mode: Mode = "required" if choice == "required" else "auto"
        allowed = tuple(names)
    else:
        if choice.function.name not in names:
            raise InvalidRequest(
                f"tool_choice names the function '{choice.function.name}', "
                f"which is not in tools ({', '.join(names)})",
                param="tool_choice",
            )
        mode, allowed = "named", (choice.function.name,)
    parallel = req.parallel_tool_calls is not False and mode != "named"
    return ToolPlan([_tool_dict(t) for t in tools], mode, allowed, parallel)


def _tool_dict(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.function.name}
    if tool.function.description:
        function["description"] = tool.function.description
    function["parameters"] = tool.function.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


# ----------------------------------------------------------------- grammar


def _answer_rule_source(response_format: ResponseFormat | None) -> str | None:
    """The grammar of a text answer under `response_format` (None: free text)."""
    if response_format is None or response_format.type == "text":
        return None
    schema = response_format.answer_schema()
    if schema is None:
        return JSON_OBJECT_GRAMMAR
    param = (
        "response_format.json_schema.schema"
        if response_format.json_schema is not None and response_format.json_schema.schema_
        else "response_format.schema"
    )
    try:
        if response_format.strict:
            check_strict(schema)
        return schema_grammar(schema, strict=response_format.strict)
    except UnsupportedSchema as exc:
        raise InvalidRequest(_schema_message(exc), param=param) from None


def _tools_grammar(req: ChatCompletionRequest, plan: ToolPlan) -> tuple[str, str]:
    """The grammar of the answer and the text it must begin with. `required` and named
    choices begin with the call's opening (and, for one function, its name): that much is
    prefilled, and the grammar covers the rest."""
    builder = GrammarBuilder()
    tools = {t.function.name: (i, t) for i, t in enumerate(req.tools or [])}
    bodies = []  # per function: its call after `{` up to the closing `}`
    for name in plan.allowed:
        index, tool = tools[name]
        parameters = tool.function.parameters or {"type": "object", "properties": {}}
        try:
            if tool.function.strict:
                check_strict(parameters)
            arguments = builder.schema(
                parameters, name=f"args-{index}", strict=bool(tool.function.strict)
            )
        except UnsupportedSchema as exc:
            raise InvalidRequest(
                _schema_message(exc), param=f"tools.{index}.function.parameters"
            ) from None
        head = f'"name": {json.dumps(name)}, "arguments": '
        bodies.append((head, arguments))
    alternatives = " | ".join(f"{literal(head)} {arguments}" for head, arguments in bodies)
    close = literal("}" + CALL_CLOSE)
    call = builder.rule("tool-call", f"{literal(CALL_OPEN + '{')} ( {alternatives} ) {close}")
    more = f' ( "\\n" {call} ){{0,{MAX_PARALLEL_CALLS - 1}}}' if plan.parallel else ""
    if plan.mode == "auto":
        answer = _answer_rule(builder, req.response_format)
        return builder.build(f"( {call}{more} ) | {answer}"), ""
    if len(bodies) == 1:  # one function: its name is known, the model writes the arguments
        head, arguments = bodies[0]
        return builder.build(f"{arguments} {close}{more}"), CALL_OPEN + "{" + head
    return builder.build(f"( {alternatives} ) {close}{more}"), CALL_OPEN + "{"


def _answer_rule(builder: GrammarBuilder, response_format: ResponseFormat | None) -> str:
    """The rule of a text answer beside tool calls: JSON by the response_format, or free text
    that does not open a call."""
    if response_format is not None and response_format.type != "text":
        schema = response_format.answer_schema()
        if schema is None:
            return builder.any_object()
        try:
            return builder.schema(schema, name="answer", strict=response_format.strict)
        except UnsupportedSchema as exc:
            raise InvalidRequest(_schema_message(exc), param="response_format") from None
    # Free text: anything whose first character cannot begin a call (or hide one behind
    # leading whitespace), so every answer is unambiguously text or calls.
    return builder.rule("text", "[^<\\x20\\t\\n\\r] [^\\x00]*")


def _schema_message(exc: UnsupportedSchema) -> str:
    where = f" at '{exc.path}'" if exc.path else ""
    return f"invalid or unsupported JSON Schema{where}: {exc}"


# ----------------------------------------------------------------- prompt


GENERIC_INSTRUCTIONS = (
    "You can call functions. Here they are, as JSON:\n{tools}\n\n"
    'To call a function, answer with {open}{{"name": <function name>, "arguments": '
    "<arguments as a JSON object>}}{close}{extra}"
)


def prompt_messages(
    messages: list[ChatMessage], plan: ToolPlan | None, template_takes_tools: bool
) -> list[dict[str, Any]]:
    """The conversation as the chat template sees it: tool calls and tool results rendered for
    it, and (for a template that does not take tools) the tools described in a system message.
    Raises 400 for a tool result that answers no call, or arguments that are not JSON."""
    calls: dict[str, str] = {}  # tool_call_id -> function name, as the calls appear
    rendered = []
    for i, m in enumerate(messages):
        if m.tool_calls:
            rendered.append(_assistant_calls(m, i, calls, template_takes_tools))
        elif m.role == "tool":
            rendered.append(_tool_result(m, i, calls, template_takes_tools))
        else:
            rendered.append(
                {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            )
    if plan is not None and not template_takes_tools:
        rendered = _with_instructions(rendered, plan)
    return rendered


def _assistant_calls(m: ChatMessage, i: int, calls: dict[str, str], native: bool) -> dict[str, Any]:
    parsed = []
    for j, call in enumerate(m.tool_calls or []):
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError as exc:
            raise InvalidRequest(
                f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {exc}",
                param=f"messages.{i}.tool_calls.{j}.function.arguments",
            ) from None
        if not isinstance(arguments, dict):
            raise InvalidRequest(
                f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object",
                param=f"messages.{i}.tool_calls.{j}.function.arguments",
            )
        calls[call.id] = call.function.name
        parsed.append((call, arguments))
    if native:
        return {
            "role": "assistant",
            "content": m.text(),
            "tool_calls": [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": args},
                }
                for c, args in parsed
            ],
        }
    blocks = "\n".join(
        CALL_OPEN
        + json.dumps({"name": c.function.name, "arguments": args}, ensure_ascii=False)
        + CALL_CLOSE
        for c, args in parsed
    )
    text = m.text()
    return {"role": "assistant", "content": f"{text}\n{blocks}" if text else blocks}


def _tool_result(m: ChatMessage, i: int, calls: dict[str, str], native: bool) -> dict[str, Any]:
    name = calls.get(m.tool_call_id or "")
    if name is None:
        raise InvalidRequest(
            f"messages[{i}] is a tool result for '{m.tool_call_id}', but no earlier assistant "
            "message made a tool call with that id",
            param=f"messages.{i}.tool_call_id",
        )
    if native:
        return {"role": "tool", "content": m.text(), "tool_call_id": m.tool_call_id, "name": name}
    result = json.dumps({"name": name, "content": m.text()}, ensure_ascii=False)
    return {"role": "user", "content": f"<tool_response>{result}</tool_response>"}


def _with_instructions(messages: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, Any]]:
    offered = [t for t in plan.tools if t["function"]["name"] in plan.allowed]
    extra = {
        "auto": ". Otherwise, answer normally.",
        "required": ". You must call at least one function.",
        "named": f". You must call {plan.allowed[0]}.",
    }[plan.mode]
    text = GENERIC_INSTRUCTIONS.format(
        tools="\n".join(json.dumps(t["function"], ensure_ascii=False) for t in offered),
        open=CALL_OPEN,
        close=CALL_CLOSE,
        extra=extra,
    )
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# ----------------------------------------------------------------- answer


@dataclass
class CallStart:
    """A tool call begins: its index in the answer, its id and the function's name."""

    index: int
    id: str
    name: str


@dataclass
class CallArguments:
    """A fragment of a tool call's arguments (JSON text)."""

    index: int
    text: str


@dataclass
class Content:
    """Text of the answer that is not a tool call."""

    text: str


Event = CallStart | CallArguments | Content

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


@dataclass
class ToolCallParser:
    """Turns generated text into content and tool calls, incrementally: the first call's name as
    soon as it is complete and its arguments as they are generated; each later call when it is
    complete, because a small model may repeat a call it just made instead of ending its turn:
    such a repeat is dropped and `repeated` is set, so the caller stops the generation. A later
    call cut short by the token limit is dropped the same way; only the first call can be
    truncated (then finish_reason says "length")."""

    calls_allowed: bool
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (id, name, arguments)
    content: str = ""
    repeated: bool = False
    _buffer: str = ""
    _state: Literal["start", "text", "between", "head", "arguments", "tail"] = "start"
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _events: list[Event] = field(default_factory=list)
    _held: list[Event] | None = None  # events of a later call, until it is complete

    def feed(self, text: str) -> list[Event]:
        """Events for the next piece of generated text."""
        self._buffer += text
        while self._buffer and not self.repeated:
            before = (self._state, len(self._buffer))
            getattr(self, f"_on_{self._state}")()
            if (self._state, len(self._buffer)) == before:
                break  # waiting for more text
        return self._take()

    def finish(self) -> list[Event]:
        """Events for text held back when generation ended (a truncated call stays truncated)."""
        if self._state in ("start", "text") and self._buffer:
            self._emit(Content(self._buffer))
        elif self._state == "arguments" and self._buffer:
            self._arguments(self._buffer)
        self._buffer = ""
        if self._held is not None:  # a later call cut short: the complete ones are the answer
            self.calls.pop()
            self.repeated = True
            self._held = None
        return self._take()

    @property
    def called(self) -> bool:
        """Whether the answer is tool calls."""
        return bool(self.calls)

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _emit(self, event: Event) -> None:
        if isinstance(event, Content):
            self.content += event.text
        (self._events if self._held is None else self._held).append(event)

    def _on_start(self) -> None:
        stripped = self._buffer.lstrip()
        if not self.calls_allowed:
            self._state = "text"
        elif stripped.startswith(CALL_OPEN):
            self._buffer = stripped[len(CALL_OPEN) :]
            self._state = "head"
        elif stripped and not CALL_OPEN.startswith(stripped):
            self._state = "text"
        # else: nothing yet, or the beginning of a call's opening tag

    def _on_text(self) -> None:
        self._emit(Content(self._buffer))
        self._buffer = ""

    def _on_between(self) -> None:
        stripped = self._buffer.lstrip()
        if stripped.startswith(CALL_OPEN):
            self._buffer = stripped[len(CALL_OPEN) :]
            self._state = "head"
        elif stripped and not CALL_OPEN.startswith(stripped):
            self._buffer = ""  # nothing but calls may follow a call; the grammar sees to it

    def _on_head(self) -> None:
        found = _HEAD.match(self._buffer)
        if found is not None:
            name = json.loads(found.group(1))
            call_id = f"call_{uuid.uuid4().hex[:24]}"
            if self.calls:
                self._held = []
            self.calls.append((call_id, name, ""))
            self._emit(CallStart(len(self.calls) - 1, call_id, name))
            self._buffer = self._buffer[found.end() :]
            self._state, self._depth = "arguments", 0
            self._in_string = self._escaped = False

    def _on_arguments(self) -> None:
        text, self._buffer = self._buffer, ""
        self._arguments(text)

    def _on_tail(self) -> None:
        end = self._buffer.find(CALL_CLOSE)
        if end < 0:
            return
        self._buffer = self._buffer[end + len(CALL_CLOSE) :]
        self._state = "between"
        if self._held is None:
            return
        _, name, arguments = self.calls[-1]
        if any((n, a) == (name, arguments) for _, n, a in self.calls[:-1]):
            self.calls.pop()
            self.repeated = True
        else:
            self._events.extend(self._held)
        self._held = None

    def _arguments(self, text: str) -> None:
        """Scan JSON text of the arguments; at the end of their object, switch to the tail."""
        if self._depth == 0:
            text = text.lstrip()  # the space after "arguments": may come with the brace
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._emit_arguments(text[: i + 1])
                    self._buffer = text[i + 1 :] + self._buffer
                    self._state = "tail"
                    return
        self._emit_arguments(text)

    def _emit_arguments(self, text: str) -> None:
        if not text:
            return
        call_id, name, arguments = self.calls[-1]
        self.calls[-1] = (call_id, name, arguments + text)
        self._emit(CallArguments(len(self.calls) - 1, text))
