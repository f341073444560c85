"""One generation's data: sampling parameters, the streamed text, its result, stop strings.

Shared by the in-process engine and the llama-server engine; nothing here touches llama.cpp.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """What the sampler and stopping logic need for one generation."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class GenerationResult:
    """Filled in when a generation ends."""

    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    time_to_first_token_s: float | None = None
    decode_tokens_per_s: float | None = None
    interrupted: bool = False  # stopped by a deadline or a cancel, not by the model or max_tokens


_END = object()


@dataclass
class Generation:
    """An iterator of text pieces produced on the engine thread; `result` is set at the end.

    With `streaming=False` the pieces are handed over once, at the end: the waiting thread is
    not woken per token, which on a 2-vCPU Lambda would steal a core from llama.cpp's threads.
    """

    streaming: bool = True
    _pieces: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _buffer: list[str] = field(default_factory=list)
    result: GenerationResult = field(default_factory=GenerationResult)

    def emit(self, text: str) -> None:
        """Called on the engine thread for each piece of text."""
        if self.streaming:
            self._pieces.put(text)
        else:
            self._buffer.append(text)

    def finish(self, error: BaseException | None = None) -> None:
        """Called on the engine thread when the generation ends (with its error, if any)."""
        if self._buffer:
            self._pieces.put("".join(self._buffer))
            self._buffer.clear()
        if error is not None:
            self._pieces.put(error)
        self._pieces.put(_END)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._pieces.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        """Ask the engine to stop this generation at the next token (client went away)."""
        self._cancel.set()

    def text(self) -> str:
        """Consume the whole generation and return its text."""
        return "".join(self)


class StopMatcher:
    """Finds stop sequences in streamed text, holding back only what could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop sequence was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """Text held back when generation ended without a stop."""
        out, self.pending = self.pending, ""
        return out
