"""Response shapes: how one completion pipeline presents its result for each API.

The pipeline (`handler.service.openai_service`) prepares a prompt, generates and streams the same
way for every API; a shape says only what differs: how the request becomes a prompt, and how text
becomes a choice, in full or as chunks. Chat completions and text completions are two shapes; a
new API is a new shape, not a new pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from handler.config import Settings
from handler.engine import InferenceEngine
from handler.errors import InvalidRequest
from handler.service.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest

# Completion tokens kept free when CONTEXT_OVERFLOW=truncate and the request sets no max_tokens.
TRUNCATION_RESERVE = 256

RequestT_contra = TypeVar("RequestT_contra", bound=SamplingRequest, contravariant=True)


@dataclass(frozen=True)
class Prompt:
    """A request's prompt: its tokens, the stop strings its format adds, the field it came from."""

    tokens: list[int]
    stops: tuple[str, ...]
    param: str


class ResponseShape(Protocol[RequestT_contra]):
    """What one API changes in the completion pipeline."""

    name: str  # for logs and response-cache keys
    id_prefix: str
    object: str
    chunk_object: str
    extra_fields: dict[str, Any]  # top-level fields of full responses and chunks

    def check(self, req: RequestT_contra, settings: Settings) -> None:
        """Input checks that need no model (they answer 4xx even while it loads)."""
        ...

    def prompt(self, req: RequestT_contra, engine: InferenceEngine, settings: Settings) -> Prompt:
        """The prompt, validated; raises a 4xx APIError for bad input."""
        ...

    def cache_inputs(self, req: RequestT_contra) -> list[Any]:
        """What of the request shapes the answer, besides the sampling fields."""
        ...

    def full_choice(self, req: RequestT_contra, text: str) -> dict[str, Any]:
        """The choice of a complete response, without index, logprobs and finish_reason."""
        ...

    def opening(self, req: RequestT_contra) -> list[dict[str, Any]]:
        """Choices streamed before the first token."""
        ...

    def piece(self, text: str) -> dict[str, Any]:
        """The choice of a chunk that carries `text`."""
        ...

    def closing(self) -> dict[str, Any]:
        """The choice of the chunk that carries the finish_reason."""
        ...


class ChatShape:
    """POST /v1/chat/completions: messages in, an assistant message out."""

    name = "chat"
    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    extra_fields: dict[str, Any] = {"system_fingerprint": None}

    def check(self, req: ChatCompletionRequest, settings: Settings) -> None:
        """At most MAX_MESSAGES messages."""
        if len(req.messages) > settings.max_messages:
            raise InvalidRequest(
                f"too many messages: {len(req.messages)} > {settings.max_messages}",
                param="messages",
            )

    def prompt(
        self, req: ChatCompletionRequest, engine: InferenceEngine, settings: Settings
    ) -> Prompt:
        """The chat template's rendering; with CONTEXT_OVERFLOW=truncate, old turns dropped."""
        messages = [
            {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            for m in req.messages
        ]
        tokens, stops = engine.chat_prompt(messages)
        if settings.context_overflow == "truncate":
            reserve = req.token_limit or min(TRUNCATION_RESERVE, settings.max_tokens_cap)
            tokens, stops = _drop_old_turns(
                engine, messages, (tokens, stops), reserve, settings.n_ctx
            )
        if not tokens:  # role markers make this unreachable today; a template may drop them
            raise InvalidRequest(
                "messages render to no tokens: they must have at least one", param="messages"
            )
        return Prompt(tokens, stops, "messages")

    def cache_inputs(self, req: ChatCompletionRequest) -> list[Any]:
        """The messages as sent."""
        return [m.model_dump(exclude_none=True) for m in req.messages]

    def full_choice(self, req: ChatCompletionRequest, text: str) -> dict[str, Any]:
        """The assistant message."""
        return {"message": {"role": "assistant", "content": text}}

    def opening(self, req: ChatCompletionRequest) -> list[dict[str, Any]]:
        """The role, first, as OpenAI streams it."""
        return [{"delta": {"role": "assistant", "content": ""}}]

    def piece(self, text: str) -> dict[str, Any]:
        """A content delta."""
        return {"delta": {"content": text}}

    def closing(self) -> dict[str, Any]:
        """An empty delta."""
        return {"delta": {}}


class TextShape:
    """POST /v1/completions: a prompt in, its continuation out."""

    name = "completion"
    id_prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"
    extra_fields: dict[str, Any] = {}

    def check(self, req: CompletionRequest, settings: Settings) -> None:
        """Nothing beyond the schema."""

    def prompt(self, req: CompletionRequest, engine: InferenceEngine, settings: Settings) -> Prompt:
        """The prompt's tokens; an empty one is refused (llama.cpp cannot decode nothing)."""
        tokens = engine.tokenize(req.prompt_text, add_bos=True)
        if not tokens:
            raise InvalidRequest("prompt is empty: it must have at least one token", param="prompt")
        return Prompt(tokens, (), "prompt")

    def cache_inputs(self, req: CompletionRequest) -> list[Any]:
        """The prompt and whether it is echoed."""
        return [req.prompt_text, req.echo]

    def full_choice(self, req: CompletionRequest, text: str) -> dict[str, Any]:
        """The text, after the prompt with `echo`."""
        return {"text": (req.prompt_text + text) if req.echo else text}

    def opening(self, req: CompletionRequest) -> list[dict[str, Any]]:
        """The prompt, with `echo`."""
        return [{"text": req.prompt_text}] if req.echo else []

    def piece(self, text: str) -> dict[str, Any]:
        """A text fragment."""
        return {"text": text}

    def closing(self) -> dict[str, Any]:
        """No text."""
        return {"text": ""}


CHAT = ChatShape()
TEXT = TextShape()


def _drop_old_turns(
    engine: InferenceEngine,
    messages: list[dict[str, Any]],
    rendered: tuple[list[int], tuple[str, ...]],
    reserve: int,
    n_ctx: int,
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
        tokens, stops = engine.chat_prompt(kept)
    return tokens, stops
