"""The OpenAI API's logic, free of any web framework: one completion pipeline for every shape.

The web routes (`handler.web.routes`) and direct Lambda invokes both call this, so a direct invoke
runs exactly the same validation and generation as an HTTP request. Everything that can fail on
input runs before the first streamed byte, so it becomes a 4xx.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from threading import Event
from typing import Any, TypeVar

from handler.config import Settings
from handler.deadline import Deadline
from handler.engine import Generation, InferenceEngine, SamplingParams
from handler.engine.generation import WAIT as WAIT_PIECE
from handler.engine.generation import TokenLogprob
from handler.engine.prompts import completion_budget
from handler.errors import APIError, InvalidRequest
from handler.service.admission import Admission
from handler.service.chunk_stream import WAIT, ChunkStream
from handler.service.objects import encode_embedding, model_card, new_id, now, usage
from handler.service.response_cache import ResponseCache
from handler.service.schemas import EmbeddingRequest, SamplingRequest
from handler.service.shapes import ChoiceStream, Prompt, ResponseShape
from handler.service.tools import Constraints
from handler.telemetry import Metrics

log = logging.getLogger("coldstart.api")

RequestT = TypeVar("RequestT", bound=SamplingRequest)


class OpenAIService:
    """Completions of every shape, embeddings and models on one engine."""

    def __init__(
        self, engine: InferenceEngine, settings: Settings, metrics: Metrics | None = None
    ) -> None:
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

    # ------------------------------------------------------------- completions

    def complete(
        self,
        shape: ResponseShape[RequestT],
        req: RequestT,
        deadline: Deadline,
        cancel: Event | None = None,
    ) -> dict[str, Any]:
        """A complete response; setting `cancel` stops it (the client went away)."""
        key = self._cache_key(shape, req)
        if key is not None and (cached := self.responses.get(key)) is not None:
            return self._from_cache(cached, shape.id_prefix)
        with self.admission.slot():
            constraints, prompt, params = self._prepare(shape, req, deadline)
            # Parallel tool calls are watched as they come, to stop a model that repeats one.
            watch = constraints.plan is not None and constraints.plan.parallel
            generations = self._generate(
                prompt, params, req, deadline, streaming=watch, cancel=cancel
            )
            choices = [
                self._complete_choice(index, shape.choice(req, constraints), generation, params)
                for index, generation in enumerate(generations)
            ]
        for generation in generations:
            self._log(shape, generation)
        response = {
            "id": new_id(shape.id_prefix),
            "object": shape.object,
            "created": now(),
            "model": self.settings.model_id,
            "choices": choices,
            "usage": _usage(generations),
            **shape.extra_fields,
        }
        self._remember(key, response, generations)
        return response

    @staticmethod
    def _complete_choice(
        index: int, choice: ChoiceStream, generation: Generation, params: SamplingParams
    ) -> dict[str, Any]:
        logprobs: list[TokenLogprob] = []
        for piece in generation.pieces():
            choice.feed(piece.text)
            logprobs.extend(piece.logprobs)
            if choice.done:
                generation.cancel()
        fields, finish = choice.message(generation.result.finish_reason)
        return {
            "index": index,
            **fields,
            "logprobs": choice.logprobs(logprobs) if params.logprobs is not None else None,
            "finish_reason": finish,
        }

    def stream(
        self, shape: ResponseShape[RequestT], req: RequestT, deadline: Deadline
    ) -> ChunkStream:
        """Validate and start now, then return an iterator of the shape's chunks; the request's
        admission ticket is released when the stream ends or is closed."""
        ticket = self.admission.claim()
        try:
            constraints, prompt, params = self._prepare(shape, req, deadline)
            generations = self._generate(prompt, params, req, deadline, streaming=True)
        except BaseException:
            ticket.release()
            raise

        def cancel() -> None:
            for generation in generations:
                generation.cancel()

        def listen(notify: Callable[[], None]) -> bool:
            # All or none: the chunks read the generations one after the other.
            return all([generation.listen(notify) for generation in generations])

        chunks = self._chunks(shape, req, constraints, params, generations)
        return ChunkStream(chunks, ticket.release, cancel, listen)

    def _generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        req: SamplingRequest,
        deadline: Deadline,
        *,
        streaming: bool,
        cancel: Event | None = None,
    ) -> list[Generation]:
        """The request's `n` generations, started at once. The in-process engine runs them one
        after the other, each reusing the prompt the first evaluated (its KV cache prefix);
        llama-server runs them on parallel slots. A seed gives each choice its own (seed + i)."""
        generations = []
        for i in range(req.n or 1):
            seeded = (
                params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)
            )
            generations.append(
                self.engine.generate(
                    prompt.tokens, seeded, deadline, streaming=streaming, cancel=cancel
                )
            )
        return generations

    def _chunks(
        self,
        shape: ResponseShape[RequestT],
        req: RequestT,
        constraints: Constraints,
        params: SamplingParams,
        generations: list[Generation],
    ) -> Iterator[dict[str, Any]]:
        base = {
            "id": new_id(shape.id_prefix),
            "object": shape.chunk_object,
            "created": now(),
            "model": self.settings.model_id,
            **shape.extra_fields,
        }
        extra = {"usage": None} if req.include_usage else {}
        want_logprobs = params.logprobs is not None

        def chunk(
            index: int, fields: dict[str, Any], finish: str | None = None, logprobs: Any = None
        ) -> dict[str, Any]:
            full = {"index": index, **fields, "logprobs": logprobs, "finish_reason": finish}
            return {**base, "choices": [full], **extra}

        try:
            for index, generation in enumerate(generations):
                choice = shape.choice(req, constraints)
                for opening in choice.opening():
                    yield chunk(index, opening)
                held: list[TokenLogprob] = []  # logprobs of text the choice holds back
                for piece in generation.pieces_or_wait():
                    if piece is WAIT_PIECE:
                        yield WAIT
                        continue
                    held.extend(piece.logprobs)
                    for fields in choice.feed(piece.text):
                        logprobs = choice.logprobs(held) if want_logprobs and held else None
                        held = [] if logprobs is not None else held
                        yield chunk(index, fields, logprobs=logprobs)
                    if choice.done:
                        generation.cancel()
                closing, finish = choice.closing(generation.result.finish_reason)
                for i, fields in enumerate(closing):
                    last = i == len(closing) - 1
                    logprobs = choice.logprobs(held) if want_logprobs and held else None
                    held = [] if logprobs is not None else held
                    yield chunk(index, fields, finish if last else None, logprobs)
            if req.include_usage:
                yield {**base, "choices": [], "usage": _usage(generations)}
        finally:
            for generation in generations:
                generation.cancel()
                self._log(shape, generation)

    def _prepare(
        self, shape: ResponseShape[RequestT], req: RequestT, deadline: Deadline
    ) -> tuple[Constraints, Prompt, SamplingParams]:
        """Check the request, wait for the model, build the prompt, size the completion."""
        constraints = shape.check(req, self.settings)
        self.engine.require_loaded(deadline)
        prompt = shape.prompt(req, self.engine, self.settings, constraints)
        return constraints, prompt, self._params(req, prompt, constraints)

    def _params(
        self, req: SamplingRequest, prompt: Prompt, constraints: Constraints
    ) -> SamplingParams:
        limit = req.token_limit
        cap = self.settings.max_tokens_cap
        if limit is not None and limit > cap:
            raise InvalidRequest(
                f"max_tokens {limit} is above this server's cap of {cap}", param="max_tokens"
            )
        max_tokens = completion_budget(
            self.settings.n_ctx, cap, len(prompt.tokens), limit, prompt.param
        )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            stop=req.stop_list() + prompt.stops,
            seed=req.seed,
            grammar=constraints.grammar,
            logprobs=req.logprobs_top,
        )

    # ------------------------------------------------------------- embeddings

    def embeddings(self, req: EmbeddingRequest, deadline: Deadline) -> dict[str, Any]:
        """POST /v1/embeddings."""
        with self.admission.slot():
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

    # ------------------------------------------------------------- response cache

    def _cache_key(self, shape: ResponseShape[RequestT], req: RequestT) -> str | None:
        """The response-cache key of a deterministic request, None when it must not be cached."""
        if not self.responses.enabled or req.temperature != 0:
            return None
        return ResponseCache.key(
            shape.name,
            {
                "model": self.settings.model_id,
                "inputs": shape.cache_inputs(req),
                "max_tokens": req.token_limit,
                "stop": list(req.stop_list()),
                "presence_penalty": req.presence_penalty or 0.0,
                "frequency_penalty": req.frequency_penalty or 0.0,
                "n_ctx": self.settings.n_ctx,
                "context_overflow": self.settings.context_overflow,
            },
        )

    def _remember(
        self, key: str | None, response: dict[str, Any], generations: list[Generation]
    ) -> None:
        """Cache a complete answer (never one cut short by a deadline or a client leaving)."""
        if key is None:
            return
        self.metrics.record("ResponseCacheHit", 0.0)
        if not any(g.result.interrupted for g in generations):
            self.responses.put(key, response)

    def _from_cache(self, cached: dict[str, Any], prefix: str) -> dict[str, Any]:
        self.metrics.record("ResponseCacheHit", 1.0)
        return {**cached, "id": new_id(prefix), "created": now(), "cached": True}

    # ------------------------------------------------------------- telemetry

    def _log(self, shape: ResponseShape[Any], generation: Generation) -> None:
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
            shape.name,
            r.prompt_tokens,
            r.completion_tokens,
            r.finish_reason,
            r.queue_s,
            f"{r.time_to_first_token_s:.3f}" if r.time_to_first_token_s is not None else "-",
            f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-",
        )


def _usage(generations: list[Generation]) -> dict[str, int]:
    """Usage of all choices: the prompt counted once, as OpenAI counts it."""
    prompt = generations[0].result.prompt_tokens if generations else 0
    return usage(prompt, sum(g.result.completion_tokens for g in generations))
