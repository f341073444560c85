"""The engine contract: what the OpenAI service needs from whichever engine generates.

Two engines implement it (`handler.engine.in_process`, `handler.engine.llama_server`); the
service, the web layer and the Lambda entry points depend on this Protocol only, so neither
engine's internals leak upward and a test may pass any object that satisfies it.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from handler.deadline import Deadline
from handler.engine.generation import Generation, SamplingParams
from handler.engine.lifecycle import EngineState, EngineStatus

ChatMessages = list[dict[str, Any]]


class InferenceEngine(Protocol):
    """A model that loads in the background and generates tokens."""

    @property
    def state(self) -> EngineState:
        """The lifecycle state (cheap: never waits, never touches the model)."""
        ...

    def start(self) -> None:
        """Begin resolving and loading the model in the background (idempotent)."""
        ...

    def app_built(self) -> None:
        """The entry point has imported and built what serves requests: storage it read from
        is free for the engine's own read-ahead."""
        ...

    def wait_loaded(self, timeout_s: float | None) -> EngineState:
        """Block until loaded or failed, or until `timeout_s`; the state then."""
        ...

    def require_loaded(self, deadline: Deadline) -> None:
        """Wait for the model until `deadline` at most; raise ModelNotReady (503) if it is not."""
        ...

    def status(self) -> EngineStatus:
        """A snapshot for readiness, pings and metrics."""
        ...

    def warm_up(self, deadline: Deadline = None) -> EngineStatus:
        """Run the tiny warm-up evaluation once; later calls return at once."""
        ...

    def chat_prompt(
        self, messages: ChatMessages, tools: list[dict[str, Any]] | None = None
    ) -> tuple[list[int], tuple[str, ...]]:
        """Messages rendered by the model's chat template: (tokens, extra stop strings); `tools`
        (OpenAI function tools) are rendered by templates that take them."""
        ...

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders a `tools` list itself (else the service describes
        the tools in a system message)."""
        ...

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text` by the model's vocabulary."""
        ...

    def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        deadline: Deadline = None,
        streaming: bool = True,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Start a generation; iterate the result for text. Setting `cancel` stops it."""
        ...

    def embed(self, texts: list[str], deadline: Deadline = None) -> tuple[list[list[float]], int]:
        """Normalised embedding vectors and the token count."""
        ...

    def make_resident(self) -> int:
        """Read every weight page into memory (before a freeze); the bytes resident then."""
        ...

    def restored(self) -> None:
        """After a SnapStart restore: adopt this machine's CPUs; raise if the engine did not
        survive the snapshot (the after-restore hook reports it)."""
        ...

    def close(self) -> None:
        """Release what the engine holds (threads stay daemons; child processes stop)."""
        ...
