"""Renders chat messages with the model's own Jinja chat template (from its GGUF metadata).

The same rendering rules as Hugging Face transformers (sandboxed, trim_blocks, lstrip_blocks,
`tojson`, `raise_exception`), so the prompt matches what the model was trained on, including
template details such as a default system message.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any


class TemplateError(ValueError):
    """The template rejected the messages (e.g. roles out of order)."""


class ChatTemplate:
    """A compiled chat template."""

    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(source)
        # Templates written for tool use read a `tools` variable (Hermes, Qwen, Llama 3.1, ...).
        self.takes_tools = "tools" in source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """The prompt text, ending with the assistant's turn opener; `tools` (OpenAI's
        function tools) go to templates that take them."""
        extra = {"tools": tools} if tools else {}
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except TemplateError:
            raise
        except Exception as exc:  # noqa: BLE001 - any template failure is the caller's input
            raise TemplateError(str(exc)) from None


def plain_prompt(messages: list[dict[str, Any]]) -> str:
    """A neutral format for models without a chat template."""
    lines = [f"{m['role']}: {m.get('content') or ''}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise(message: str) -> None:
    raise TemplateError(message)
