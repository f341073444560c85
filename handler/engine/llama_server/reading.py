"""A streamed /completion's chunks turned into our pieces, whoever reads them: the thread that
iterates a streamed generation (`LlamaServerEngine._read_stream`) or the collector's one thread
for every buffered answer read as a stream (`collector.Collector`)."""

from __future__ import annotations

import time
from typing import Any

from handler.engine.generation import (
    GenerationResult,
    Piece,
    SamplingParams,
    StopMatcher,
    TokenLogprob,
)
from handler.engine.llama_server.sampling import parse_logprobs


class StreamReading:
    """The state of one streamed answer: stop strings matched here (as the in-process engine
    does), the end-of-generation token left out of the counts and the logprobs, each token's
    logprobs handed on with the text they belong to. `done` once the answer has ended."""

    def __init__(self, params: SamplingParams, result: GenerationResult) -> None:
        self.params = params
        self.result = result
        self.started = time.perf_counter()  # the request is sent next
        self.done = False
        self.first_at: float | None = None
        self._stops = StopMatcher(params.stop)
        self._hit_stop = False
        self._pending: list[TokenLogprob] = []  # logprobs of tokens whose text is not out yet
        self._reported = 0  # logprobs handed on so far

    def add(self, chunk: dict[str, Any]) -> Piece | None:
        """One chunk of the answer; the piece it completes, if any."""
        result = self.result
        if self.first_at is None:
            self.first_at = time.perf_counter()
            result.time_to_first_token_s = self.first_at - self.started
        predicted = int(chunk.get("tokens_predicted", result.completion_tokens + 1))
        if chunk.get("stop"):
            # The last chunk counts the end-of-generation token; ours never does.
            eos = chunk.get("stop_type") == "eos"
            result.completion_tokens = predicted - 1 if eos else predicted
            result.finish_reason = "stop" if eos else "length"
            # The end-of-generation token came as a chunk of its own: not ours either.
            del self._pending[max(0, result.completion_tokens - self._reported) :]
            self.done = True
            return None
        result.completion_tokens = predicted
        if self.params.logprobs is not None:
            self._pending.extend(parse_logprobs(chunk, self.params.logprobs))
        text, self._hit_stop = self._stops.feed(chunk.get("content", ""))
        piece = None
        if text:
            piece = Piece(text, tuple(self._pending))
            self._reported += len(self._pending)
            self._pending.clear()
        if self._hit_stop:
            result.finish_reason = "stop"
            self.done = True
        return piece

    def end(self) -> Piece | None:
        """The answer is over (or stopped): the text a stop string's prefix held back, if no
        stop string matched; sets the decode rate."""
        tail = "" if self._hit_stop else self._stops.flush()
        self.result.set_decode_rate(self.first_at)
        if tail or (self._pending and not self._hit_stop):
            return Piece(tail, tuple(self._pending))
        return None
