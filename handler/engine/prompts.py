"""Prompt rules both engines share: chat rendering and the completion budget of a context."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from handler.engine.chat_template import ChatTemplate, TemplateError, plain_prompt
from handler.errors import ContextLengthExceeded, InvalidRequest

# The warm-up evaluation's prompt: one tiny evaluation allocates the compute buffers.
WARMUP_PROMPT = "Hi"

# What a model without a chat template sees after its turn, so it stops there.
PLAIN_PROMPT_STOPS = ("\nuser:",)

Tokenize = Callable[[str, bool, bool], list[int]]  # (text, add_bos, special) -> tokens


def render_chat(
    template: ChatTemplate | None,
    messages: list[dict[str, Any]],
    tokenize: Tokenize,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], tuple[str, ...]]:
    """Messages (and the tools, for a template that takes them) as prompt tokens and the extra
    stop strings the prompt format needs."""
    if template is None:
        return tokenize(plain_prompt(messages), True, False), PLAIN_PROMPT_STOPS
    try:
        text = template.render(messages, tools)
    except TemplateError as exc:
        raise InvalidRequest(
            f"messages could not be rendered by the model's chat template: {exc}",
            param="messages",
        ) from None
    return tokenize(text, True, True), ()


def completion_budget(
    n_ctx: int, max_tokens_cap: int, prompt_tokens: int, max_tokens: int | None, param: str
) -> int:
    """Tokens the completion may use, or `context_length_exceeded` naming `param`."""
    if max_tokens is not None and prompt_tokens + max_tokens > n_ctx:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion). Please reduce the prompt or the completion.",
            param=param,
        )
    if prompt_tokens >= n_ctx:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {n_ctx} tokens. However, your prompt "
            f"has {prompt_tokens} tokens. Please reduce the length of the prompt.",
            param=param,
        )
    room = n_ctx - prompt_tokens
    return min(room, max_tokens if max_tokens is not None else room, max_tokens_cap)
