"""Response shapes: how one completion pipeline presents its result for each API.

The pipeline (`handler.service.openai_service`) prepares a prompt, generates and streams the same
way for every API; a shape says only what differs: how the request becomes a prompt, and how text
becomes a choice, in full or as chunks. Chat completions and text completions are two shapes; a
new API is a new shape, not a new pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from handler.config import Settings
from handler.engine import InferenceEngine
from handler.engine.generation import TokenLogprob
from handler.errors import InvalidRequest
from handler.service.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest
from handler.service.tools import (
    CallStart,
    Constraints,
    Content,
    Event,
    ToolCallParser,
    constraints,
    prompt_messages,
)

# Completion tokens kept free when CONTEXT_OVERFLOW=truncate and the request sets no max_tokens.
TRUNCATION_RESERVE = 256

RequestT_contra = TypeVar("RequestT_contra", bound=SamplingRequest, contravariant=True)


@dataclass(frozen=True)
class Prompt:
    """A request's prompt: its tokens, the stop strings its format adds, the field it came from."""

    tokens: list[int]
    stops: tuple[str, ...]
    param: str


class ChoiceStream(Protocol):
    """One choice of a response as the generation produces it: text in, choice fields out."""

    def opening(self) -> list[dict[str, Any]]:
        """Choice fields streamed before the first token."""
        ...

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Choice fields (deltas) for the next piece of text; none while text is held back."""
        ...

    def closing(self, finish_reason: str) -> tuple[list[dict[str, Any]], str]:
        """The last deltas and the finish_reason the choice reports."""
        ...

    def logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        """The `logprobs` object of a choice or chunk for these tokens."""
        ...

    def message(self, finish_reason: str) -> tuple[dict[str, Any], str]:
        """The fields of the complete choice (of all text fed), and its finish_reason."""
        ...

    @property
    def done(self) -> bool:
        """Whether the choice needs no more text (the generation can stop)."""
        ...


class ResponseShape(Protocol[RequestT_contra]):
    """What one API changes in the completion pipeline."""

    name: str  # for logs and response-cache keys
    id_prefix: str
    object: str
    chunk_object: str
    extra_fields: dict[str, Any]  # top-level fields of full responses and chunks

    def check(self, req: RequestT_contra, settings: Settings) -> Constraints:
        """Input checks that need no model (they answer 4xx even while it loads), and the
        grammar and tools the request brings."""
        ...

    def prompt(
        self,
        req: RequestT_contra,
        engine: InferenceEngine,
        settings: Settings,
        constraints: Constraints,
    ) -> Prompt:
        """The prompt, validated; raises a 4xx APIError for bad input."""
        ...

    def cache_inputs(self, req: RequestT_contra) -> list[Any]:
        """What of the request shapes the answer, besides the sampling fields."""
        ...

    def choice(self, req: RequestT_contra, constraints: Constraints) -> ChoiceStream:
        """A new choice of this request."""
        ...


def _check_choices(n: int | None, settings: Settings) -> None:
    if n is not None and n > settings.max_choices:
        raise InvalidRequest(
            f"n={n} is above this server's limit of {settings.max_choices} choices",
            param="n",
        )


class ChatShape:
    """POST /v1/chat/completions: messages in, an assistant message (text or tool calls) out."""

    name = "chat"
    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    extra_fields: dict[str, Any] = {"system_fingerprint": None}

    def check(self, req: ChatCompletionRequest, settings: Settings) -> Constraints:
        """At most MAX_MESSAGES messages and MAX_CHOICES choices; tools and formats valid."""
        if len(req.messages) > settings.max_messages:
            raise InvalidRequest(
                f"too many messages: {len(req.messages)} > {settings.max_messages}",
                param="messages",
            )
        _check_choices(req.n, settings)
        found = constraints(req)
        # Tool results must answer calls: checked here, before the model is needed.
        prompt_messages(req.messages, found.plan, template_takes_tools=False)
        return found

    def prompt(
        self,
        req: ChatCompletionRequest,
        engine: InferenceEngine,
        settings: Settings,
        constraints: Constraints,
    ) -> Prompt:
        """The chat template's rendering; with CONTEXT_OVERFLOW=truncate, old turns dropped."""
        plan = constraints.plan
        native = plan is not None and engine.template_takes_tools
        messages = prompt_messages(req.messages, plan, engine.template_takes_tools)
        tools = plan.tools if native and plan is not None else None
        tokens, stops = engine.chat_prompt(messages, tools)
        if settings.context_overflow == "truncate":
            reserve = req.token_limit or min(TRUNCATION_RESERVE, settings.max_tokens_cap)
            tokens, stops = _drop_old_turns(
                engine, messages, (tokens, stops), reserve, settings.n_ctx, tools=tools
            )
        if not tokens:  # role markers make this unreachable today; a template may drop them
            raise InvalidRequest(
                "messages render to no tokens: they must have at least one", param="messages"
            )
        if constraints.prefill:  # our own text: its tags may be the model's special tokens
            tokens = tokens + engine.tokenize(constraints.prefill, add_bos=False, special=True)
        return Prompt(tokens, stops, "messages")

    def cache_inputs(self, req: ChatCompletionRequest) -> list[Any]:
        """The messages and everything else that changes the answer."""
        return [
            [m.model_dump(exclude_none=True) for m in req.messages],
            req.model_dump(
                include={"tools", "tool_choice", "parallel_tool_calls", "response_format"},
                exclude_none=True,
                by_alias=True,
            ),
            req.logprobs_top,
            req.n,
        ]

    def choice(self, req: ChatCompletionRequest, constraints: Constraints) -> ChoiceStream:
        """An assistant message; tool calls parsed out of it when tools are on."""
        parser = ToolCallParser(calls_allowed=constraints.plan is not None)
        return _ChatChoice(parser, constraints.prefill)


class _ChatChoice:
    def __init__(self, parser: ToolCallParser, prefill: str) -> None:
        self.parser = parser
        # The prefilled start of the answer is the answer's: a call's name streams at once.
        self.prefilled = [_delta(e) for e in parser.feed(prefill)] if prefill else []

    def opening(self) -> list[dict[str, Any]]:
        return [{"delta": {"role": "assistant", "content": ""}}, *self.prefilled]

    def feed(self, text: str) -> list[dict[str, Any]]:
        return [_delta(e) for e in self.parser.feed(text)]

    def closing(self, finish_reason: str) -> tuple[list[dict[str, Any]], str]:
        deltas = [_delta(e) for e in self.parser.finish()]
        return [*deltas, {"delta": {}}], self._finish_reason(finish_reason)

    def logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        return {"content": [_chat_logprob(e) for e in entries], "refusal": None}

    @property
    def done(self) -> bool:
        return self.parser.repeated

    def message(self, finish_reason: str) -> tuple[dict[str, Any], str]:
        self.parser.finish()
        content = self.parser.content
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if self.parser.called:
            message["content"] = content or None
            message["tool_calls"] = [
                {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                for i, n, a in self.parser.calls
            ]
        return {"message": message}, self._finish_reason(finish_reason)

    def _finish_reason(self, finish_reason: str) -> str:
        if self.parser.called and (finish_reason == "stop" or self.parser.repeated):
            return "tool_calls"
        return finish_reason


def _delta(event: Event) -> dict[str, Any]:
    if isinstance(event, Content):
        return {"delta": {"content": event.text}}
    if isinstance(event, CallStart):
        call = {
            "index": event.index,
            "id": event.id,
            "type": "function",
            "function": {"name": event.name, "arguments": ""},
        }
        return {"delta": {"tool_calls": [call]}}
    return {
        "delta": {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
    }


def _chat_logprob(entry: TokenLogprob) -> dict[str, Any]:
    return {
        "token": entry.token,
        "logprob": entry.logprob,
        "bytes": list(entry.bytes),
        "top_logprobs": [
            {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in entry.top
        ],
    }


class TextShape:
    """POST /v1/completions: a prompt in, its continuation out."""

    name = "completion"
    id_prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"
    extra_fields: dict[str, Any] = {}

    def check(self, req: CompletionRequest, settings: Settings) -> Constraints:
        """At most MAX_CHOICES choices."""
        _check_choices(req.n, settings)
        return Constraints()

    def prompt(
        self,
        req: CompletionRequest,
        engine: InferenceEngine,
        settings: Settings,
        constraints: Constraints,
    ) -> Prompt:
        """The prompt's tokens; an empty one is refused (llama.cpp cannot decode nothing)."""
        tokens = engine.tokenize(req.prompt_text, add_bos=True)
        if not tokens:
            raise InvalidRequest("prompt is empty: it must have at least one token", param="prompt")
        return Prompt(tokens, (), "prompt")

    def cache_inputs(self, req: CompletionRequest) -> list[Any]:
        """The prompt, whether it is echoed, logprobs and choices."""
        return [req.prompt_text, req.echo, req.logprobs, req.n]

    def choice(self, req: CompletionRequest, constraints: Constraints) -> ChoiceStream:
        """A continuation (after the prompt with `echo`)."""
        return _TextChoice(req.prompt_text if req.echo else "")


class _TextChoice:
    done = False

    def __init__(self, echoed: str) -> None:
        self.echoed = echoed
        self.text = echoed
        self.offset = len(echoed)  # of the next token, in characters of the choice's text

    def opening(self) -> list[dict[str, Any]]:
        return [{"text": self.echoed}] if self.echoed else []

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.text += text
        return [{"text": text}] if text else []

    def closing(self, finish_reason: str) -> tuple[list[dict[str, Any]], str]:
        return [{"text": ""}], finish_reason

    def logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        offsets = []
        for e in entries:
            offsets.append(self.offset)
            self.offset += len(e.token)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
            "text_offset": offsets,
        }

    def message(self, finish_reason: str) -> tuple[dict[str, Any], str]:
        return {"text": self.text}, finish_reason


CHAT = ChatShape()
TEXT = TextShape()


def _drop_old_turns(
    engine: InferenceEngine,
    messages: list[dict[str, Any]],
    rendered: tuple[list[int], tuple[str, ...]],
    reserve: int,
    n_ctx: int,
    *,
    tools: list[dict[str, Any]] | None,
) -> tuple[list[int], tuple[str, ...]]:
    """Sliding window: drop the oldest non-system messages (never the last) until the prompt
    and `reserve` completion tokens fit `n_ctx`."""
    tokens, stops = rendered
    kept = list(messages)
    while len(tokens) + reserve > n_ctx:
        droppable = [i for i, m in enumerate(kept[:-1]) if m["role"] not in ("system", "developer")]
        if not droppable:
            break  # nothing left to drop: the usual context_length_exceeded follows
        del kept[droppable[0]]
        tokens, stops = engine.chat_prompt(kept, tools)
    return tokens, stops
