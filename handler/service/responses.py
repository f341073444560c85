"""POST /v1/responses (OpenAI's Responses API), stateless, as a translation over the chat pipeline.

A Responses request becomes a chat-completions request (`to_chat`) and the chat pipeline answers
it; `handler.service.responses_output` makes its chat.completion a response object, or its chunks
the Responses API's named stream events. Nothing is stored, so whatever needs a store
(`previous_response_id`, `store: true`, `conversation`, `background`), a reasoning model or a
tool we do not run (web search, file search, ...) is a 400 naming the field, never ignored.
"""

from __future__ import annotations

from threading import Event
from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from handler.deadline import Deadline
from handler.errors import APIError, InvalidRequest
from handler.service.chunk_stream import ChunkStream
from handler.service.openai_service import OpenAIService
from handler.service.responses_output import ResponseEvents, from_chat
from handler.service.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    SamplingRequest,
    _Request,
)
from handler.service.shapes import CHAT

# The one `include` value we can produce (the chat pipeline's logprobs).
LOGPROBS_INCLUDE = "message.output_text.logprobs"

# A chat request's parameter -> the Responses request's parameter it came from.
_RESPONSES_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "logprobs": "include",
}


def _plain_error(message: str) -> PydanticCustomError:
    # A custom error keeps pydantic's "Value error, " prefix out of the 400's message.
    return PydanticCustomError("invalid_value", "{message}", {"message": message})


# ------------------------------------------------------------------ the request


class ContentPart(_Request):
    """A text part of a message's content (or of a function call's output)."""

    type: Literal["input_text", "output_text"]
    text: str

    @field_validator("type", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if value not in ("input_text", "output_text"):
            raise _plain_error(
                f"content type {value!r} is not supported: only text (input_text, output_text)"
            )
        return value


def _as_parts(value: Any) -> Any:
    """A string content as one text part: Responses accepts both."""
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


def _text(parts: list[ContentPart]) -> str:
    return "".join(part.text for part in parts)


class MessageItem(_Request):
    """A message; `type` may be left out ({role, content}, the openai client's shorthand)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: list[ContentPart]

    _content = field_validator("content", mode="before")(_as_parts)


class FunctionCallItem(_Request):
    """A function call the model made earlier, sent back with the conversation."""

    type: Literal["function_call"]
    call_id: str = Field(..., min_length=1)
    name: str = Field(..., min_length=1)
    arguments: str


class FunctionCallOutputItem(_Request):
    """The caller's result of a function call."""

    type: Literal["function_call_output"]
    call_id: str = Field(..., min_length=1)
    output: list[ContentPart]

    _output = field_validator("output", mode="before")(_as_parts)


ITEM_TYPES = ("message", "function_call", "function_call_output")


def _item_type(value: Any) -> str | None:
    found = (
        value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    )
    return found if isinstance(found, str) else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(_Request):
    """A function the model may call (Responses' flat shape: no `function` wrapper)."""

    type: Literal["function"]
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _functions_only(cls, value: Any) -> Any:
        if value != "function":
            raise _plain_error(
                f"tool type {value!r} is not supported: only function tools (this server runs "
                "no built-in tools)"
            )
        return value

    def as_dict(self) -> dict[str, Any]:
        """The tool as a response echoes it."""
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "strict": self.strict,
        }


class ToolChoiceFunction(_Request):
    """`tool_choice: {"type": "function", "name": ...}`: call this function."""

    type: Literal["function"]
    name: str = Field(..., min_length=1)


class TextFormat(_Request):
    """`text.format`: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_required(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise _plain_error("a json_schema format needs name and schema")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The format as a response echoes it."""
        return self.model_dump(by_alias=True, exclude_none=True)

    def response_format(self) -> dict[str, Any] | None:
        """The chat request's `response_format`, None for plain text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        schema: dict[str, Any] = {"name": self.name, "schema": self.schema_}
        schema |= {"description": self.description, "strict": self.strict}
        return {"type": "json_schema", "json_schema": _without_none(schema)}


class TextConfig(_Request):
    """`text`: its format; `verbosity` is accepted and echoed (a hint for OpenAI's models)."""

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(SamplingRequest):
    """POST /v1/responses. `stop`, `seed` and the penalties are SamplingRequest's extensions."""

    input: list[InputItem] = Field(..., min_length=1)
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    metadata: Annotated[dict[str, str], Field(max_length=16)] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    include: list[str] | None = None
    # What needs a store or a reasoning model: accepted only when it asks for nothing.
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    prompt: Any = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["disabled", "auto"] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if not isinstance(value, list):
            raise _plain_error("input must be a string or a list of input items")
        for i, item in enumerate(value):
            kind = _item_type(item)
            if kind not in ITEM_TYPES:
                raise _plain_error(
                    f"item {i} has type {kind!r}: only {', '.join(ITEM_TYPES)} items are supported"
                )
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _known_tool_choice(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "function":
            raise _plain_error(
                f"tool_choice type {value.get('type')!r} is not supported: use none, auto, "
                "required or {type: function, name}"
            )
        return value

    @field_validator("include")
    @classmethod
    def _includable(cls, value: list[str] | None) -> list[str] | None:
        for item in value or ():
            if item != LOGPROBS_INCLUDE:
                raise _plain_error(f"include {item!r} is not supported: only {LOGPROBS_INCLUDE}")
        return value

    @field_validator("store")
    @classmethod
    def _no_store(cls, value: bool | None) -> bool | None:
        if value:
            raise _plain_error("store: true is not supported: this server keeps no responses")
        return value

    @field_validator("previous_response_id", "conversation", "prompt")
    @classmethod
    def _no_state(cls, value: Any) -> Any:
        if value is not None:
            raise _plain_error(
                "this server keeps no responses, conversations or prompts: send the whole "
                "conversation in input"
            )
        return value

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: bool | None) -> bool | None:
        if value:
            raise _plain_error("background responses are not supported")
        return value

    @field_validator("reasoning")
    @classmethod
    def _no_reasoning(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and any(v is not None for v in value.values()):
            raise _plain_error(
                "reasoning is not supported: the served model is not a reasoning model"
            )
        return value

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, value: str | None) -> str | None:
        if value == "auto":
            raise _plain_error("truncation: auto is not supported (see CONTEXT_OVERFLOW)")
        return value

    @property
    def token_limit(self) -> int | None:
        """`max_output_tokens`."""
        return self.max_output_tokens

    @property
    def wants_logprobs(self) -> bool:
        """Whether the output text carries logprobs."""
        return LOGPROBS_INCLUDE in (self.include or ()) or bool(self.top_logprobs)


def is_responses_payload(payload: dict[str, Any]) -> bool:
    """Whether a direct invoke's payload with `input` is a response request, not embeddings':
    its input holds an item object, or it has a field of the Responses API's own (what every
    generating request shares, such as `temperature`, is not enough: before this route, any
    payload with `input` was embeddings')."""
    items = payload.get("input")
    if isinstance(items, list) and any(isinstance(item, dict) for item in items):
        return True
    return not _RESPONSES_ONLY.isdisjoint(payload)


_RESPONSES_ONLY = frozenset(ResponsesRequest.model_fields) - set(SamplingRequest.model_fields)
_RESPONSES_ONLY -= {"input"}


# ------------------------------------------------------------------ request -> chat


def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat-completions request that answers `req`; a 400 naming `req`'s field when the
    chat pipeline cannot take something."""
    body: dict[str, Any] = {"messages": _messages(req), "stream": req.stream}
    if req.stream:
        body["stream_options"] = {"include_usage": True}  # response.completed carries usage
    sampling: tuple[str, ...] = ("model", "temperature", "top_p", "stop", "seed", "user")
    sampling += ("presence_penalty", "frequency_penalty")
    body.update({k: getattr(req, k) for k in sampling if getattr(req, k) is not None})
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    if req.tools:
        body["tools"] = [{"type": "function", "function": _function(t)} for t in req.tools]
        if req.tool_choice is not None:
            body["tool_choice"] = _chat_tool_choice(req.tool_choice)
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    elif req.tool_choice == "required" or isinstance(req.tool_choice, ToolChoiceFunction):
        raise InvalidRequest("tool_choice needs tools: the request has none", param="tool_choice")
    response_format = req.text.format.response_format() if req.text and req.text.format else None
    if response_format is not None:
        body["response_format"] = response_format
    if req.wants_logprobs:
        body["logprobs"] = True
        if req.top_logprobs:
            body["top_logprobs"] = req.top_logprobs
    _require_chat_support(body)
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        chat_param = ".".join(str(p) for p in first.get("loc", ()))
        param = responses_param(chat_param)
        raise InvalidRequest(f"{param}: {first.get('msg', 'invalid value')}", param=param) from None


def responses_param(chat_param: str | None) -> str | None:
    """The Responses request's field a chat request's parameter came from: message indexes do
    not match item indexes (`messages.3` is `input`); a tool's are the same (`tools.0.function.
    parameters` is `tools.0.parameters`)."""
    if chat_param is None:
        return None
    parts = chat_param.split(".")
    if parts[0] == "tools" and len(parts) > 1:
        return ".".join(p for p in parts if p != "function")
    return _RESPONSES_PARAMS.get(parts[0], parts[0])


def _require_chat_support(body: dict[str, Any]) -> None:
    """A 400 for anything the chat pipeline has no field for: silently dropped, it would change
    the answer (a tool call answered with text)."""
    for name in body:
        if name not in ChatCompletionRequest.model_fields:
            param = responses_param(name)
            raise InvalidRequest(f"{param} is not supported by this server", param=param)
    for message in body["messages"]:
        for name in message:
            if name not in ChatMessage.model_fields:
                raise InvalidRequest(
                    "function_call and function_call_output items are not supported by this server",
                    param="input",
                )


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """Chat messages: instructions first, then each item; consecutive function calls join the
    assistant message before them, as one chat turn holds both."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    for item in req.input:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append(
                {"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)}
            )
    return messages


def _function(tool: FunctionTool) -> dict[str, Any]:
    return _without_none({k: v for k, v in tool.as_dict().items() if k != "type"})


def _without_none(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _chat_tool_choice(choice: str | ToolChoiceFunction) -> Any:
    if isinstance(choice, ToolChoiceFunction):
        return {"type": "function", "function": {"name": choice.name}}
    return choice


# ------------------------------------------------------------------ the route


def create_response(
    service: OpenAIService, req: ResponsesRequest, deadline: Deadline, cancel: Event | None = None
) -> dict[str, Any] | ChunkStream:
    """POST /v1/responses: a response object, or its stream of events."""
    chat_req = to_chat(req)
    try:
        if req.stream:
            chat = service.stream(CHAT, chat_req, deadline)
            return ResponseEvents(req, service.settings.model_id, chat)
        return from_chat(req, service.complete(CHAT, chat_req, deadline, cancel))
    except APIError as exc:
        exc.param = responses_param(exc.param)
        raise
