"""The OpenAI API's logic, free of any web framework.

FastAPI routes (`handler.api`) and direct Lambda invokes (`handler.lambda_function`) both call this,
so a direct invoke runs exactly the same validation and generation as an HTTP request.
Everything that can fail on input runs before the first streamed byte, so it becomes a 4xx.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from threading import Event
from typing import Any

from handler.admission import Admission
from handler.config import Settings
from handler.engine import Engine
from handler.errors import APIError, InvalidRequest
from handler.generation import Generation, SamplingParams
from handler.prompt_cache import ResponseCache
from handler.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    encode_embedding,
    model_card,
    new_id,
    now,
    usage,
)
from handler.telemetry import Metrics

log = logging.getLogger("coldstart.api")

# Completion tokens kept free when CONTEXT_OVERFLOW=truncate and the request sets no max_tokens.
TRUNCATION_RESERVE = 256


@dataclass
class Prepared:
    """A validated request, ready to generate."""

    prompt: list[int]
    params: SamplingParams


class OpenAIService:
    """Chat completions, completions, embeddings and models on one engine."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.admission = Admission(settings.max_concurrency, settings.max_queue)
        self.responses = ResponseCache(
            settings.response_cache_entries, settings.response_cache_mb << 20
        )
        self.created = now()

    # ------------------------------------------------------------- models

    def models(self) -> dict[str, Any]:
        """GET /v1/models."""
        return {"object": "list", "data": [model_card(self.settings.model_id, self.created)]}

    def model(self, model_id: str) -> dict[str, Any]:
        """GET /v1/models/{id}."""
        if model_id != self.settings.model_id:
            raise APIError(
                f"The model '{model_id}' does not exist",
                param="model",
                code="model_not_found",
                status=404,
            )
        return model_card(model_id, self.created)

    # ------------------------------------------------------------- chat

    def prepare_chat(self, req: ChatCompletionRequest, deadline: float | None) -> Prepared:
        """Validate, render the chat template and size the completion."""
        if len(req.messages) > self.settings.max_messages:
            raise InvalidRequest(
                f"too many messages: {len(req.messages)} > {self.settings.max_messages}",
                param="messages",
            )
        self.engine.require_loaded(deadline)
        messages = [
            {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            for m in req.messages
        ]
        prompt, template_stops = self.engine.chat_prompt(messages)
        if self.settings.context_overflow == "truncate":
            prompt, template_stops = self._fit_by_dropping_old_turns(
                messages, prompt, template_stops, req.token_limit
            )
        return Prepared(prompt, self._params(req, len(prompt), "messages", template_stops))

    def _fit_by_dropping_old_turns(
        self,
        messages: list[dict[str, Any]],
        prompt: list[int],
        stops: tuple[str, ...],
        token_limit: int | None,
    ) -> tuple[list[int], tuple[str, ...]]:
        """Sliding window: drop the oldest non-system messages (never the last) until it fits."""
        reserve = token_limit or min(TRUNCATION_RESERVE, self.settings.max_tokens_cap)
        kept = list(messages)
        while len(prompt) + reserve > self.settings.n_ctx:
            droppable = [
                i for i, m in enumerate(kept[:-1]) if m["role"] not in ("system", "developer")
            ]
            if not droppable:
                break  # nothing left to drop: the usual context_length_exceeded follows
            del kept[droppable[0]]
            prompt, stops = self.engine.chat_prompt(kept)
        return prompt, stops

    def chat(
        self, req: ChatCompletionRequest, deadline: float | None, cancel: Event | None = None
    ) -> dict[str, Any]:
        """A complete chat completion; setting `cancel` stops it (the client went away)."""
        key = self._cache_key("chat", req, [m.model_dump(exclude_none=True) for m in req.messages])
        if key is not None and (cached := self.responses.get(key)) is not None:
            return self._from_cache(cached, "chatcmpl")
        with self.admission.slot():
            prepared = self.prepare_chat(req, deadline)
            generation = self.engine.generate(
                prepared.prompt, prepared.params, deadline, streaming=False, cancel=cancel
            )
            text = generation.text()
        result = generation.result
        self._log(req, generation)
        response = {
            "id": new_id("chatcmpl"),
            "object": "chat.completion",
            "created": now(),
            "model": self.settings.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": usage(result.prompt_tokens, result.completion_tokens),
            "system_fingerprint": None,
        }
        self._remember(key, response, generation)
        return response

    def chat_stream(self, req: ChatCompletionRequest, deadline: float | None) -> ChunkStream:
        """Validate now, then return an iterator of `chat.completion.chunk` objects."""
        with self._admitted_stream() as release:
            prepared = self.prepare_chat(req, deadline)
            generation = self.engine.generate(prepared.prompt, prepared.params, deadline)
            return ChunkStream(self._chat_chunks(req, generation), release, generation.cancel)

    def _chat_chunks(
        self, req: ChatCompletionRequest, generation: Generation
    ) -> Iterator[dict[str, Any]]:
        base = {
            "id": new_id("chatcmpl"),
            "object": "chat.completion.chunk",
            "created": now(),
            "model": self.settings.model_id,
            "system_fingerprint": None,
        }
        extra = {"usage": None} if req.include_usage else {}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice], **extra}

        try:
            yield chunk({"role": "assistant", "content": ""})
            for piece in generation:
                yield chunk({"content": piece})
            yield chunk({}, generation.result.finish_reason)
            if req.include_usage:
                r = generation.result
                yield {**base, "choices": [], "usage": usage(r.prompt_tokens, r.completion_tokens)}
        finally:
            generation.cancel()
            self._log(req, generation)

    # ------------------------------------------------------------- completions

    def prepare_completion(self, req: CompletionRequest, deadline: float | None) -> Prepared:
        """Validate, tokenize and size the completion."""
        self.engine.require_loaded(deadline)
        prompt = self.engine.tokenize(req.prompt_text, add_bos=True)
        if not prompt:  # llama.cpp cannot decode an empty batch (models that add no BOS)
            raise InvalidRequest("prompt is empty: it must have at least one token", param="prompt")
        return Prepared(prompt, self._params(req, len(prompt), "prompt", ()))

    def completion(
        self, req: CompletionRequest, deadline: float | None, cancel: Event | None = None
    ) -> dict[str, Any]:
        """A complete text completion; setting `cancel` stops it (the client went away)."""
        key = self._cache_key("completion", req, [req.prompt_text, req.echo])
        if key is not None and (cached := self.responses.get(key)) is not None:
            return self._from_cache(cached, "cmpl")
        with self.admission.slot():
            prepared = self.prepare_completion(req, deadline)
            generation = self.engine.generate(
                prepared.prompt, prepared.params, deadline, streaming=False, cancel=cancel
            )
            text = generation.text()
        result = generation.result
        self._log(req, generation)
        response = {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": now(),
            "model": self.settings.model_id,
            "choices": [
                {
                    "index": 0,
                    "text": (req.prompt_text + text) if req.echo else text,
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": usage(result.prompt_tokens, result.completion_tokens),
        }
        self._remember(key, response, generation)
        return response

    def completion_stream(self, req: CompletionRequest, deadline: float | None) -> ChunkStream:
        """Validate now, then return an iterator of `text_completion` chunks."""
        with self._admitted_stream() as release:
            prepared = self.prepare_completion(req, deadline)
            generation = self.engine.generate(prepared.prompt, prepared.params, deadline)
            return ChunkStream(self._completion_chunks(req, generation), release, generation.cancel)

    def _completion_chunks(
        self, req: CompletionRequest, generation: Generation
    ) -> Iterator[dict[str, Any]]:
        base = {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": now(),
            "model": self.settings.model_id,
        }
        extra = {"usage": None} if req.include_usage else {}

        def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice], **extra}

        try:
            if req.echo:
                yield chunk(req.prompt_text)
            for piece in generation:
                yield chunk(piece)
            yield chunk("", generation.result.finish_reason)
            if req.include_usage:
                r = generation.result
                yield {**base, "choices": [], "usage": usage(r.prompt_tokens, r.completion_tokens)}
        finally:
            generation.cancel()
            self._log(req, generation)

    # ------------------------------------------------------------- embeddings

    def embeddings(self, req: EmbeddingRequest, deadline: float | None) -> dict[str, Any]:
        """POST /v1/embeddings."""
        with self.admission.slot():
            return self._embeddings(req, deadline)

    def _embeddings(self, req: EmbeddingRequest, deadline: float | None) -> dict[str, Any]:
        self.engine.require_loaded(deadline)
        texts = req.texts()
        if any(not t for t in texts):
            raise InvalidRequest("input must not contain empty strings", param="input")
        vectors, n_tokens = self.engine.embed(texts, deadline)
        if req.dimensions is not None and vectors and req.dimensions != len(vectors[0]):
            raise InvalidRequest(
                f"this model produces {len(vectors[0])} dimensions; "
                f"dimensions={req.dimensions} is not supported",
                param="dimensions",
            )
        return {
            "object": "list",
            "data": [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": encode_embedding(v, req.encoding_format),
                }
                for i, v in enumerate(vectors)
            ],
            "model": self.settings.model_id,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }

    # ------------------------------------------------------------- shared

    def _cache_key(
        self, kind: str, req: ChatCompletionRequest | CompletionRequest, inputs: list[Any]
    ) -> str | None:
        """The response-cache key of a deterministic request, None when it must not be cached."""
        if not self.responses.enabled or req.temperature != 0:
            return None
        return ResponseCache.key(
            kind,
            {
                "model": self.settings.model_id,
                "inputs": inputs,
                "max_tokens": req.token_limit,
                "stop": list(req.stop_list()),
                "presence_penalty": req.presence_penalty or 0.0,
                "frequency_penalty": req.frequency_penalty or 0.0,
                "n_ctx": self.settings.n_ctx,
                "context_overflow": self.settings.context_overflow,
            },
        )

    def _remember(self, key: str | None, response: dict[str, Any], generation: Generation) -> None:
        """Cache a complete answer (never one cut short by a deadline or a client leaving)."""
        if key is None:
            return
        self.metrics.record("ResponseCacheHit", 0.0)
        if not generation.result.interrupted:
            self.responses.put(key, response)

    def _from_cache(self, cached: dict[str, Any], prefix: str) -> dict[str, Any]:
        self.metrics.record("ResponseCacheHit", 1.0)
        return {**cached, "id": new_id(prefix), "created": now(), "cached": True}

    @contextmanager
    def _admitted_stream(self) -> Iterator[Callable[[], None]]:
        """Admit a streamed request; the slot is released when its iterator ends, or here if
        preparing it fails."""
        self.admission.acquire()
        started = time.monotonic()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admission.release(time.monotonic() - started)

        try:
            yield release
        except BaseException:
            release()
            raise

    def _params(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        prompt_tokens: int,
        param: str,
        template_stops: tuple[str, ...],
    ) -> SamplingParams:
        limit = req.token_limit
        cap = self.settings.max_tokens_cap
        if limit is not None and limit > cap:
            raise InvalidRequest(
                f"max_tokens {limit} is above this server's cap of {cap}", param="max_tokens"
            )
        max_tokens = self.engine.check_fits(prompt_tokens, limit, param)
        temperature = 1.0 if req.temperature is None else req.temperature
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            stop=req.stop_list() + template_stops,
            seed=req.seed,
        )

    def _log(self, req: Any, generation: Generation) -> None:
        r = generation.result
        self.metrics.record_many(
            {
                "QueueDuration": r.queue_s,
                "TimeToFirstToken": r.time_to_first_token_s,
                "TokensPerSecond": r.decode_tokens_per_s,
                "CompletionTokens": r.completion_tokens,
                "PromptTokens": r.prompt_tokens,
            }
        )
        log.info(
            "%s done: prompt_tokens=%d completion_tokens=%d finish=%s queue_s=%.3f "
            "ttft_s=%s tps=%s",
            type(req).__name__,
            r.prompt_tokens,
            r.completion_tokens,
            r.finish_reason,
            r.queue_s,
            f"{r.time_to_first_token_s:.3f}" if r.time_to_first_token_s is not None else "-",
            f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-",
        )


class ChunkStream(Iterator[dict[str, Any]]):
    """The chunks of a streamed response. `close()` (the client went away, or the response is
    done) stops the generation and frees the admission slot, from any thread, even while
    another thread is blocked waiting for the next chunk; dropping it unstarted does the same."""

    def __init__(
        self,
        chunks: Iterator[dict[str, Any]],
        release: Callable[[], None],
        cancel: Callable[[], None],
    ) -> None:
        self._chunks = chunks
        self._release = release
        self._cancel = cancel

    def __next__(self) -> dict[str, Any]:
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop generating and release the slot (idempotent)."""
        self._cancel()
        self._release()
        close = getattr(self._chunks, "close", None)
        if close is not None:
            # ValueError: it is running in another thread, which ends on its own now.
            with suppress(ValueError):
                close()

    def __del__(self) -> None:
        self.close()


def monotonic_deadline(remaining_ms: int | None, margin_ms: int) -> float | None:
    """A monotonic deadline from Lambda's remaining time, leaving `margin_ms` to respond."""
    if remaining_ms is None:
        return None
    return time.monotonic() + max(0, remaining_ms - margin_ms) / 1000.0
