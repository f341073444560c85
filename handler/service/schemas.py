"""OpenAI request schemas: the subset of each request body we serve, validated by pydantic.

Every text in a request must be encodable as UTF-8: JSON can carry an unpaired surrogate as a
`\\u` escape (`"\\ud800"`), Python decodes it into a `str`, and the first `.encode()` on the way to
the tokenizer fails. One check on the base class closes that class of input for every field of
every request, present and future, so it is a 400 naming the field wherever the body came from.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

Role = Literal["system", "developer", "user", "assistant", "tool"]


def not_utf8(value: Any) -> str | None:
    """Why `value` (a string, or any list, dict or model holding strings) cannot be encoded as
    UTF-8, or None when it can. A Python string fails only on an unpaired surrogate."""
    found = _first_surrogate(value, ())
    if found is None:
        return None
    path, text, index = found
    where = f" of item {'.'.join(path)}" if path else ""
    return f"unpaired surrogate U+{ord(text[index]):04X} at character {index}{where}"


def _first_surrogate(value: Any, path: tuple[str, ...]) -> tuple[tuple[str, ...], str, int] | None:
    """(where inside `value`, the string, the index) of the first unencodable character."""
    if isinstance(value, str):
        if value.isascii():  # O(1) in CPython: the common case costs nothing
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, value, exc.start
        return None
    for key, item in _children(value):
        found = _first_surrogate(item, (*path, key))
        if found is not None:
            return found
    return None


def _children(value: Any) -> Iterable[tuple[str, Any]]:
    """The items of a container, with their names; a request model checked itself when built."""
    if isinstance(value, list | tuple):
        return ((str(i), item) for i, item in enumerate(value))
    if isinstance(value, dict):  # keys are text too (a JSON Schema's property names)
        return (
            pair
            for i, (k, item) in enumerate(value.items())
            for pair in ((f"key {i}", k), (str(k) if not not_utf8(k) else f"key {i}", item))
        )
    if isinstance(value, BaseModel) and not isinstance(value, _Request):
        return ((name, getattr(value, name)) for name in type(value).model_fields)
    return ()


class _Part(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
    model_config = ConfigDict(extra="ignore")


class _Request(_Part):
    """A request body or one of its objects: every field's text must be valid UTF-8."""

    @field_validator("*")
    @classmethod
    def _text_is_utf8(cls, value: Any) -> Any:
        problem = not_utf8(value)
        if problem is not None:
            raise PydanticCustomError(
                "invalid_utf8", "text must be valid UTF-8: {problem}", {"problem": problem}
            )
        return value


class TextPart(_Part):
    """One text part of a multi-part message content. Not a `_Request`: the message holding it
    checks its text, so an error names `messages.N.content`, not a branch of the content union."""

    type: Literal["text"]
    text: str


class FunctionCall(_Part):
    """The function an assistant message called: its name and arguments (a JSON string)."""

    name: str = Field(..., max_length=256)
    arguments: str = ""


class ToolCall(_Part):
    """One tool call of an assistant message in the conversation."""

    id: str = Field(..., max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    """One chat message; content is a string or a list of text parts. An assistant message may
    carry the tool calls it made instead of content; a `tool` message answers one of them."""

    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for role '{self.role}'")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        """The content as plain text."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionDefinition(_Part):
    """A function the model may call; `parameters` is a JSON Schema of its arguments."""

    name: str = Field(..., pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Part):
    """A tool of the request (only functions exist in chat completions)."""

    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(_Part):
    """The function a named tool_choice forces (checked against the tools, so no length limit:
    a constrained string inside a union is reported once per branch)."""

    name: str


class NamedToolChoice(_Part):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"]
    function: ChosenFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(_Part):
    """`response_format.json_schema`: OpenAI's nested form."""

    name: str = Field("response", max_length=64)
    description: str | None = None
    # `schema` shadows a BaseModel attribute: the field is `schema_` and named `schema` in JSON.
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Part):
    """`response_format`: plain text, any JSON object, or JSON valid against a schema. A
    top-level `schema` (as some clients send it, in either JSON type) is honoured too."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.answer_schema() is None:
            raise ValueError("json_schema needs a schema: json_schema.schema")
        return self

    def answer_schema(self) -> dict[str, Any] | None:
        """The schema the answer must be valid against, None for any JSON object or text."""
        if self.json_schema is not None and self.json_schema.schema_ is not None:
            return self.json_schema.schema_
        return self.schema_

    @property
    def strict(self) -> bool:
        """Whether OpenAI's strict-mode rules apply to the schema."""
        return bool(self.json_schema is not None and self.json_schema.strict)


class StreamOptions(_Request):
    """`stream_options`: include_usage adds a final usage chunk."""

    include_usage: bool = False


# The strings of a union's branches stay unconstrained (`str`, not `Field(min_length=...)`): a
# constrained string makes pydantic read it itself, and a failure inside one branch is then
# reported for every branch, first as "stop.str: Input should be a valid string".
Stop = Annotated[str | Annotated[list[str], Field(max_length=4)] | None, Field(None)]


class SamplingRequest(_Request):
    """What every generating request shares: sampling, stops, streaming."""

    model: str | None = Field(None, max_length=256)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, description="choices; at most MAX_CHOICES")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=512)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not all(value):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_list(self) -> tuple[str, ...]:
        """Stop sequences as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def token_limit(self) -> int | None:
        """The requested completion length (each API names it its own way)."""
        return None

    @property
    def logprobs_top(self) -> int | None:
        """Alternatives per token when logprobs are asked for, else None."""
        return None

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    # Fields whose meaning we cannot honour: refused, never silently ignored.
    functions: Any = None
    function_call: Any = None
    logit_bias: Any = None
    modalities: Any = None
    audio: Any = None
    web_search_options: Any = None

    @field_validator("functions", "function_call")
    @classmethod
    def _no_legacy_functions(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("the legacy functions API is not supported: send tools/tool_choice")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: Any) -> Any:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if value is not None and value != ["text"]:
            raise ValueError("only the text modality is supported")
        return value

    @field_validator("audio", "web_search_options")
    @classmethod
    def _not_offered(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("this model offers no audio output or web search")
        return value

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprobs_top(self) -> int | None:
        """Alternatives per token when logprobs are asked for, else None."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        """`max_completion_tokens` (newer) or `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported")
        return value

    @model_validator(mode="after")
    def _honourable(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise ValueError("logprobs of an echoed prompt are not supported")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of other than n is not supported")
        return self

    @property
    def logprobs_top(self) -> int | None:
        """Alternatives per token when logprobs are asked for, else None."""
        return self.logprobs

    @property
    def prompt_text(self) -> str:
        """The single prompt as text."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def token_limit(self) -> int | None:
        """The requested completion length."""
        return self.max_tokens


class EmbeddingRequest(_Request):
    """POST /v1/embeddings."""

    model: str | None = Field(None, max_length=256)
    input: str | Annotated[list[str], Field(min_length=1, max_length=256)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=512)

    def texts(self) -> list[str]:
        """Inputs as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)
