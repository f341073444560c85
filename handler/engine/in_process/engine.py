"""INFERENCE_ENGINE=llama: llama.cpp in this process, through its C API (`bindings`).

The load is an mmap (near constant time in model size); warm-up is one tiny evaluation that
touches the weights. Every llama.cpp compute call runs on one dedicated engine thread: a new
calling thread would bring a second OpenMP pool onto Lambda's few vCPUs. That thread also
serialises generations (one at a time).
"""

from __future__ import annotations

import codecs
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from handler import deadline as deadlines
from handler.config import Settings, available_cpus
from handler.deadline import Deadline
from handler.engine.chat_template import ChatTemplate
from handler.engine.engine_base import EngineBase
from handler.engine.generation import Generation, SamplingParams, StopMatcher, TokenLogprob
from handler.engine.lifecycle import EngineState, EngineStatus
from handler.engine.prefix_cache import PrefixStateCache
from handler.engine.prompts import WARMUP_PROMPT, render_chat
from handler.errors import ContextLengthExceeded, InvalidRequest
from handler.model_source import Progress, ResolvedModel, resolve_model
from handler.model_source.prefetch import Prefetch

log = logging.getLogger("coldstart.engine")

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


class InProcessEngine(EngineBase):
    """Loads the model on its own thread and runs every llama.cpp call there."""

    def __init__(
        self,
        settings: Settings,
        resolver: Callable[[Settings, Progress], ResolvedModel] = resolve_model,
        prefetch: Prefetch | None = None,
    ) -> None:
        super().__init__(settings, resolver, prefetch)
        self.threads = settings.n_threads
        self._backend: Any = None  # handler.engine.in_process.bindings, imported on the thread
        self._model_handle: Any = None  # bindings.Model
        self._context: Any = None  # bindings.Context for generation
        self._embedder: Any = None  # bindings.Context with embeddings, built on first use
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()

    # ----------------------------------------------------------------- lifecycle

    def _queue_depth(self) -> int:
        """Jobs waiting for the engine thread."""
        return self._jobs.qsize()

    def _status_extra(self) -> dict[str, Any]:
        cache = self._prompt_cache_stats()
        return {"prompt_cache": cache} if cache else {}

    def _prompt_cache_stats(self) -> dict[str, int] | None:
        cache = self._context.prefix_cache if self._context is not None else None
        if cache is None:
            return None
        return {
            "entries": len(cache),
            "bytes": cache.bytes,
            "hits": cache.hits,
            "misses": cache.misses,
        }

    def warm_up(self, deadline: Deadline = None) -> EngineStatus:
        """Run the tiny warm-up evaluation once (later calls return at once)."""
        self.require_loaded(deadline)
        with self.lifecycle.warm_lock:
            if self.lifecycle.state is EngineState.READY:
                self._submit(self._warm_up_on_engine_thread).result()
        return self.status()

    def restored(self) -> None:
        """After a restore: as many llama.cpp threads as this machine's CPUs, unless N_THREADS
        pins them."""
        if "n_threads" in self.settings.set_by_environment:
            return
        threads = available_cpus()
        if threads != self.threads and self._context is not None:
            self._submit(lambda: self._set_threads(threads)).result()
        self.threads = threads

    def _set_threads(self, threads: int) -> None:
        for context in (self._context, self._embedder):
            if context is not None:
                context.set_threads(threads)

    def close(self) -> None:
        """Nothing to release: the engine thread is a daemon and the mapping ends with us."""

    def _run(self) -> None:
        """The engine thread: load, then serve jobs forever (a failed load serves none)."""
        self._load()
        self.lifecycle.ready()
        if self.settings.warmup == "init":
            self._warm_up_on_engine_thread()
        while True:
            job, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    def _load(self) -> None:
        phases = self.lifecycle
        with phases.timed("resolve_s"):
            self._model = self._resolver(self.settings, self.lifecycle.on_download_progress)
        with phases.timed("import_s"):
            from handler.engine.in_process import bindings

            bindings.init_backend(verbose=self.settings.log_level == "debug")
            self._backend = bindings
        with phases.timed("load_s"):
            path = str(self._model.path)
            model = bindings.Model(path, self.settings.n_gpu_layers)
            self._context = bindings.Context(
                model, self.settings.n_ctx, self.settings.n_batch, self.threads
            )
            if self.settings.prompt_cache_mb > 0:
                self._context.prefix_cache = PrefixStateCache(
                    self.settings.prompt_cache_mb << 20, self.settings.prompt_cache_min_tokens
                )
            self._model_handle = model
        self._chat_template = self._build_chat_template()
        log.info(
            "model loaded: %s (%d bytes) in %.3fs",
            path,
            self._model.size_bytes,
            self.lifecycle.phases.load_s,
        )

    def _build_chat_template(self) -> ChatTemplate | None:
        source = self._model_handle.metadata(CHAT_TEMPLATE_KEY)
        if not source:
            return None
        model = self._model_handle
        return ChatTemplate(source, model.special_text("bos"), model.special_text("eos"))

    def _warm_up_on_engine_thread(self) -> None:
        if self.lifecycle.state is not EngineState.READY:
            return
        with self.lifecycle.timed("warmup_s"):
            # One real evaluation: touches every weight page and allocates compute buffers, so
            # the first request pays neither. It is a one-message chat, left in the KV cache:
            # the chat template's opening (its default system prompt, the user header) is then
            # already evaluated, as it is for any request after the first.
            tokens, _ = render_chat(
                self._chat_template, [{"role": "user", "content": WARMUP_PROMPT}], self.tokenize
            )
            self._context.evaluate_prompt(tokens)
        self.lifecycle.warmed()
        log.info("model warm in %.3fs", self.lifecycle.phases.warmup_s)

    def _submit(self, job: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((job, future))
        return future

    # ----------------------------------------------------------------- prompts

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Tokens of `text` (read-only vocabulary access: safe off the engine thread)."""
        self.lifecycle.require_usable()
        tokens: list[int] = self._model_handle.tokenize(
            text, add_special=add_bos, parse_special=special
        )
        return tokens

    # ----------------------------------------------------------------- generation

    def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        deadline: Deadline = None,
        streaming: bool = True,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Queue a generation; iterate the returned object for text pieces as they are decoded
        (`streaming`) or all at once at the end. Setting `cancel` stops it at the next token."""
        self.lifecycle.require_usable()
        generation = Generation.start(len(prompt), streaming, cancel)
        queued_at = time.perf_counter()

        def job() -> None:
            error: BaseException | None = None
            try:
                generation.result.queue_s = time.perf_counter() - queued_at
                self._decode(prompt, params, deadline, generation)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer thread
                error = exc
            finally:
                generation.finish(error)

        self._submit(job)
        return generation

    def _decode(
        self, prompt: list[int], params: SamplingParams, deadline: Deadline, out: Generation
    ) -> None:
        model, context, result = self._model_handle, self._context, out.result
        self.lifecycle.warmed()  # the first real request warms the model
        if not out.begin(params.max_tokens, deadline):
            return
        sampler = self._backend.Sampler(
            self._backend.SamplerConfig(
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                min_p=params.min_p,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                repeat_penalty=params.repeat_penalty,
                seed=params.seed if params.seed is not None else random.getrandbits(32),
                grammar=params.grammar,
            ),
            model,
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        hit_stop = False
        pending: list[TokenLogprob] = []  # logprobs of tokens whose text is not emitted yet

        def sample() -> int:
            token: int = sampler.sample(context)
            if params.logprobs is not None and not model.is_end_of_generation(token):
                pending.append(self._logprob(token, params.logprobs))
            return token

        started = time.perf_counter()
        try:
            context.evaluate_prompt(prompt)
            token = sample()
            first_at = time.perf_counter()
            result.time_to_first_token_s = first_at - started
            while True:
                if model.is_end_of_generation(token):
                    result.finish_reason = "stop"
                    break
                result.completion_tokens += 1
                text, hit_stop = stops.feed(decoder.decode(model.piece(token)))
                if text:
                    out.emit(text, pending)
                    pending.clear()
                if hit_stop:
                    result.finish_reason = "stop"
                    break
                if result.completion_tokens >= params.max_tokens:
                    break
                if out.should_stop(deadline):
                    break
                context.append(token)
                token = sample()
        finally:
            sampler.close()
        if not hit_stop:
            tail, hit_stop = stops.feed(decoder.decode(b"", final=True))
            tail += "" if hit_stop else stops.flush()
            if tail or (pending and not hit_stop):
                out.emit(tail, pending)
        result.set_decode_rate(first_at)

    def _logprob(self, token: int, top: int) -> TokenLogprob:
        """`token`'s log-probability and the `top` best alternatives, from the last logits."""
        model = self._model_handle
        logprob, best = self._backend.token_logprobs(self._context, token, top)
        return TokenLogprob(
            *_token_text(model.piece(token)),
            logprob,
            tuple(TokenLogprob(*_token_text(model.piece(i)), lp) for i, lp in best),
        )

    # ----------------------------------------------------------------- embeddings

    def embed(self, texts: list[str], deadline: Deadline = None) -> tuple[list[list[float]], int]:
        """Normalised embedding vectors and the token count, computed on the engine thread."""
        self.lifecycle.require_usable()
        batches = []
        for i, text in enumerate(texts):
            tokens = self.tokenize(text, add_bos=True)
            if not tokens:  # only characters without a token ("\x04"): nothing to decode
                raise InvalidRequest(
                    f"input[{i}] has no tokens: it must have at least one", param="input"
                )
            if len(tokens) > self.settings.n_ctx:
                raise ContextLengthExceeded(
                    f"input[{i}] has {len(tokens)} tokens; the maximum is {self.settings.n_ctx}",
                    param="input",
                )
            batches.append(tokens)
        future = self._submit(lambda: self._embed_on_engine_thread(batches))
        result: tuple[list[list[float]], int] = future.result(
            timeout=deadlines.seconds_left(deadline, floor_s=0.1)
        )
        return result

    def _embed_on_engine_thread(self, batches: list[list[int]]) -> tuple[list[list[float]], int]:
        if self._embedder is None:
            # A second context on the same model: the weights are shared, only the embedding
            # context's buffers are new. Built on first use, never at init.
            self._embedder = self._backend.Context(
                self._model_handle,
                self.settings.n_ctx,
                self.settings.n_ctx,
                self.threads,
                embeddings=True,
            )
        vectors = [self._embedder.embed(tokens) for tokens in batches]
        return vectors, sum(len(t) for t in batches)


def _token_text(piece: bytes) -> tuple[str, tuple[int, ...]]:
    """A token's text (invalid UTF-8, a fragment of a character, replaced) and its bytes."""
    return piece.decode("utf-8", errors="replace"), tuple(piece)
