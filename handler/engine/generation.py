"""One generation's data: sampling parameters, the streamed text, its result, stop strings.

Shared by the in-process engine and the llama-server engine; nothing here touches llama.cpp.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from handler import deadline as deadlines


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
    grammar: str | None = None  # GBNF with a `root` rule: every token must keep the text in it
    logprobs: int | None = None  # report each token's log-probability and this many alternatives


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (before any sampler changed the
    distribution), with the most likely alternatives (whose own `top` is empty)."""

    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Piece:
    """Text handed over by the engine, with the log-probabilities of the tokens it came from
    (empty unless the request asked for them)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


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

    def set_decode_rate(self, first_token_at: float | None) -> None:
        """Tokens per second after the first one, sampled at `first_token_at` (perf_counter)."""
        if first_token_at is not None and self.completion_tokens > 1:
            elapsed = time.perf_counter() - first_token_at
            self.decode_tokens_per_s = (self.completion_tokens - 1) / elapsed if elapsed else None


_END = object()

# What a pushed generation's non-blocking reader gets when no piece has arrived yet (compared by
# identity; `PushedGeneration.pieces_or_wait`), and every layer above hands on as its own marker.
WAIT = Piece("")


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
    _buffered_logprobs: list[TokenLogprob] = field(default_factory=list)
    result: GenerationResult = field(default_factory=GenerationResult)

    @classmethod
    def start(
        cls, prompt_tokens: int, streaming: bool, cancel: threading.Event | None
    ) -> Generation:
        """A new generation for a prompt of `prompt_tokens`, stopped when `cancel` is set."""
        generation = cls(streaming=streaming)
        if cancel is not None:
            generation._cancel = cancel
        generation.result.prompt_tokens = prompt_tokens
        return generation

    def begin(self, max_tokens: int, deadline: deadlines.Deadline) -> bool:
        """Called by the engine before decoding: False when there is nothing to generate."""
        self.result.finish_reason = "length"
        if max_tokens <= 0 or deadlines.passed(deadline):
            self.result.interrupted = deadlines.passed(deadline)
            return False
        return True

    def should_stop(self, deadline: deadlines.Deadline) -> bool:
        """Whether to stop now (cancelled, or past the deadline); marks the result interrupted."""
        if self._cancel.is_set() or deadlines.passed(deadline):
            self.result.interrupted = True
            return True
        return False

    @property
    def cancelled(self) -> bool:
        """Whether `cancel()` was called (or the caller's cancel event set)."""
        return self._cancel.is_set()

    def emit(self, text: str, logprobs: Sequence[TokenLogprob] = ()) -> None:
        """Called on the engine thread for each piece of text (and its tokens' logprobs)."""
        if self.streaming:
            self._pieces.put(Piece(text, tuple(logprobs)))
        else:
            self._buffer.append(text)
            self._buffered_logprobs.extend(logprobs)

    def finish(self, error: BaseException | None = None) -> None:
        """Called on the engine thread when the generation ends (with its error, if any)."""
        if self._buffer or self._buffered_logprobs:
            self._pieces.put(Piece("".join(self._buffer), tuple(self._buffered_logprobs)))
            self._buffer.clear()
            self._buffered_logprobs.clear()
        if error is not None:
            self._pieces.put(error)
        self._pieces.put(_END)

    def __iter__(self) -> Iterator[str]:
        for piece in self.pieces():
            yield piece.text

    def pieces_or_wait(self) -> Iterator[Piece]:
        """`pieces()`, or for a generation another thread pushes into and whose reader
        `listen`s, the pieces that have arrived, then `WAIT` until the listener is called."""
        return self.pieces()

    def listen(self, notify: Callable[[], None]) -> bool:
        """Have `notify` called (on the producer's thread) whenever a piece or the end arrives,
        and `pieces_or_wait` not block; False if this generation cannot (the reader blocks)."""
        return False

    def pieces(self) -> Iterator[Piece]:
        """The pieces with their logprobs, as the engine hands them over."""
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


class PulledGeneration(Generation):
    """A generation read on the thread that iterates it: no producer thread of its own.

    The engine sends the request first (so the `n` choices of one request, and every request,
    run on parallel slots at once), then hands over `source` (`read_from`), whose pieces are
    read by whoever iterates this generation. A streamed token then wakes one thread instead of
    two, with no queue between them: at 64 streams that was 64 threads fewer contending for the
    GIL. An iteration stopped early leaves the rest for the next one. `release` (closing the
    connection, leaving the in-flight count) runs exactly once: when the source ends, however it
    ends, or when the generation is cancelled or dropped while nobody is reading it.
    """

    def __init__(
        self, prompt_tokens: int, cancel: threading.Event | None, release: Callable[[], None]
    ) -> None:
        super().__init__(streaming=True)
        if cancel is not None:
            self._cancel = cancel
        self.result.prompt_tokens = prompt_tokens
        self._release = release
        self._source: Iterator[Piece] = iter(())
        self._state = "idle"  # "idle" (unread, or an iteration stopped early), "reading", "done"
        self._state_lock = threading.Lock()

    def read_from(self, source: Iterator[Piece]) -> None:
        """The pieces to hand over (a generator, not started until the first read)."""
        self._source = source

    def end_unread(self) -> None:
        """Nothing will be read (nothing to generate, or the request could not be sent)."""
        self._release_if_idle()

    def pieces(self) -> Iterator[Piece]:
        """The pieces, read from the source on this thread; nothing once released."""
        with self._state_lock:
            if self._state != "idle":
                return
            self._state = "reading"
        try:
            for piece in self._source:  # noqa: UP028 - unlike `yield from`, this leaves it open
                yield piece
        except GeneratorExit:  # the reader stopped early: the rest waits for the next one
            with self._state_lock:
                self._state = "idle"
            if self.cancelled:
                self._release_if_idle()
            raise
        except BaseException:
            self._end()
            raise
        self._end()

    def cancel(self) -> None:
        """Stop at the next piece; with nobody reading, the request is dropped now."""
        super().cancel()
        if self._release_if_idle():
            self.result.interrupted = True

    def _end(self) -> None:
        with self._state_lock:
            self._state = "done"
        self._release()

    def _release_if_idle(self) -> bool:
        """Release the request if nobody is reading it; whether it was released now."""
        with self._state_lock:
            idle = self._state == "idle"
            if idle:
                self._state = "done"
        if idle:
            self._release()
        return idle

    def __del__(self) -> None:
        self._release_if_idle()


class PushedGeneration(Generation):
    """A generation whose pieces another thread pushes in as they arrive (the llama-server
    engine's collector, which reads every stream's socket on one thread).

    Its reader either blocks in `pieces()` until the next piece, or `listen`s: then it is called
    back after every piece and reads with `pieces_or_wait()`, which yields `WAIT` instead of
    blocking. A stream served that way parks no thread at all between its tokens. `stop` asks
    the producer to look at the generation now: it has been cancelled, or dropped (the producer
    holds it weakly); the producer then ends it (`finish`) and frees its request.
    """

    def __init__(
        self, prompt_tokens: int, cancel: threading.Event | None, stop: Callable[[], None]
    ) -> None:
        super().__init__(streaming=True)
        if cancel is not None:
            self._cancel = cancel
        self.result.prompt_tokens = prompt_tokens
        self._stop = stop
        self._arrived: deque[Any] = deque()  # pieces, then an error or _END
        self._ready = threading.Condition()
        self._notify: Callable[[], None] | None = None
        self._ended = False

    def emit(self, text: str, logprobs: Sequence[TokenLogprob] = ()) -> None:
        """On the producer's thread: one piece."""
        self.push(Piece(text, tuple(logprobs)))

    def push(self, piece: Piece) -> None:
        """On the producer's thread: one piece, handed to the reader."""
        self._arrive(piece)

    def finish(self, error: BaseException | None = None) -> None:
        """On the producer's thread: the end (with its error, if any); once."""
        with self._ready:
            if self._ended:
                return
            self._ended = True
        if error is not None:
            self._arrive(error)
        self._arrive(_END)

    def _arrive(self, item: Any) -> None:
        with self._ready:
            self._arrived.append(item)
            self._ready.notify()
            notify = self._notify
        if notify is not None:
            notify()

    def listen(self, notify: Callable[[], None]) -> bool:
        with self._ready:
            self._notify = notify
        return True

    def pieces(self) -> Iterator[Piece]:
        return self._read(block=True)

    def pieces_or_wait(self) -> Iterator[Piece]:
        return self._read(block=self._notify is None)

    def _read(self, block: bool) -> Iterator[Piece]:
        while True:
            with self._ready:
                while block and not self._arrived:
                    self._ready.wait()
                item = self._arrived.popleft() if self._arrived else WAIT
            if item is _END:
                self._arrived.appendleft(_END)  # a later read ends at once too
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        """Stop at once: the producer ends the generation (and its request) as soon as it can."""
        if not self._cancel.is_set():
            super().cancel()
            self._stop()

    def __del__(self) -> None:
        # Dropped unfinished: the producer stops it at its next look. (getattr: a generation
        # whose __init__ failed has no state.)
        if not getattr(self, "_ended", True):
            self._stop()


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
