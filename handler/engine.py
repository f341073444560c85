"""The engine: owns the llama.cpp model, its lifecycle and every call into it.

States: cold -> loading -> ready -> warm, or failed with a reason. The load is an mmap (near
constant time in model size); warm-up is one tiny evaluation that touches the weights. Every
llama.cpp compute call runs on one dedicated engine thread: a new calling thread would bring a
second OpenMP pool onto Lambda's few vCPUs. That thread also serialises generations (one at a time).
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
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from handler.chat_template import ChatTemplate, TemplateError, plain_prompt
from handler.config import Settings
from handler.errors import ContextLengthExceeded, InvalidRequest, ModelNotReady
from handler.generation import Generation, SamplingParams, StopMatcher
from handler.model_source import Progress, ResolvedModel, resolve_model
from handler.prompt_cache import PrefixStateCache

log = logging.getLogger("coldstart.engine")

WARMUP_PROMPT = "Hi"
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


class EngineState(StrEnum):
    """Lifecycle of the model; visible to callers through readiness and the keep-warm ping."""

    COLD = "cold"
    LOADING = "loading"
    READY = "ready"
    WARM = "warm"
    FAILED = "failed"


LOADED_STATES = (EngineState.READY, EngineState.WARM)


@dataclass
class Phases:
    """Wall-clock phase durations in seconds, for metrics and the cold-start waterfall."""

    resolve_s: float | None = None
    import_s: float | None = None
    load_s: float | None = None
    warmup_s: float | None = None


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot of the engine's state for readiness, pings and metrics."""

    state: EngineState
    reason: str | None
    model_id: str
    model_path: str | None
    model_bytes: int | None
    phases: Phases
    queue_depth: int
    download: tuple[int, int] | None = None
    prompt_cache: dict[str, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "state": self.state.value,
            "reason": self.reason,
            "model": self.model_id,
            "model_bytes": self.model_bytes,
            "phases_s": {k: v for k, v in vars(self.phases).items() if v is not None},
            "queue_depth": self.queue_depth,
            "lazy_mmap": lazy_mmap_active(),
            **({"prompt_cache": self.prompt_cache} if self.prompt_cache else {}),
            **(
                {"download": {"bytes_done": self.download[0], "bytes_total": self.download[1]}}
                if self.download
                else {}
            ),
        }


class Engine:
    """Loads the model on its own thread and runs every llama.cpp call there."""

    def __init__(
        self,
        settings: Settings,
        resolver: Callable[[Settings, Progress], ResolvedModel] = resolve_model,
    ) -> None:
        self.settings = settings
        self._resolver = resolver
        self._state = EngineState.COLD
        self._reason: str | None = None
        self._model: ResolvedModel | None = None
        self._backend: Any = None  # handler.llama_backend, imported on the engine thread
        self._model_handle: Any = None  # llama_backend.Model
        self._context: Any = None  # llama_backend.Context for generation
        self._embedder: Any = None  # llama_backend.Context with embeddings, built on first use
        self._chat_template: ChatTemplate | None = None
        self._phases = Phases()
        self._download: tuple[int, int] | None = None  # (bytes done, bytes total)
        self._state_changed = threading.Condition()
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._warm_lock = threading.Lock()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the engine thread, which resolves and loads the model, then serves jobs."""
        if self._thread is not None:
            return
        self._set_state(EngineState.LOADING)
        self._thread = threading.Thread(target=self._run, name="coldstart-engine", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout_s: float | None) -> EngineState:
        """Block until the model is loaded or failed, or until `timeout_s`; return the state."""
        with self._state_changed:
            self._state_changed.wait_for(
                lambda: self._state not in (EngineState.COLD, EngineState.LOADING), timeout_s
            )
            return self._state

    def require_loaded(self, deadline: float | None) -> None:
        """Wait for the model until `deadline` (monotonic); raise a 503 error if it is not there.

        Without a deadline (server mode) nothing waits: readiness tells a load balancer when to
        send traffic, and a request that arrives early gets 503 with Retry-After at once.
        """
        if self._state in LOADED_STATES:
            return
        if self._state is EngineState.COLD:
            self.start()
        timeout = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
        state = self.wait_loaded(timeout)
        if state is EngineState.FAILED:
            raise ModelNotReady(f"model failed to load: {self._reason}", retry_after_s=60)
        if state not in LOADED_STATES:
            raise ModelNotReady("model is still loading", retry_after_s=2)

    def status(self) -> EngineStatus:
        """Current state and what is known about the model."""
        model = self._model
        return EngineStatus(
            state=self._state,
            reason=self._reason,
            model_id=self.settings.model_id,
            model_path=str(model.path) if model else None,
            model_bytes=model.size_bytes if model else None,
            phases=self._phases,
            queue_depth=self._jobs.qsize(),
            download=self._download,
            prompt_cache=self._prompt_cache_stats(),
        )

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

    @property
    def state(self) -> EngineState:
        """The lifecycle state."""
        return self._state

    def warm_up(self, deadline: float | None = None) -> EngineStatus:
        """Run the tiny warm-up evaluation once (later calls return at once)."""
        self.require_loaded(deadline)
        with self._warm_lock:
            if self._state is EngineState.READY:
                self._submit(self._warm_up_on_engine_thread).result()
        return self.status()

    def _on_download_progress(self, done: int, total: int) -> None:
        self._download = (done, total)

    def _set_state(self, state: EngineState, reason: str | None = None) -> None:
        with self._state_changed:
            self._state = state
            self._reason = reason
            self._state_changed.notify_all()

    def _run(self) -> None:
        try:
            self._load()
        except Exception as exc:  # noqa: BLE001 - any load failure becomes the `failed` state
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("model load failed: %s", reason)
            self._set_state(EngineState.FAILED, reason)
        else:
            self._set_state(EngineState.READY)
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
        started = time.perf_counter()
        self._model = self._resolver(self.settings, self._on_download_progress)
        self._phases.resolve_s = time.perf_counter() - started

        started = time.perf_counter()
        from handler import llama_backend

        llama_backend.init_backend(verbose=self.settings.log_level == "debug")
        self._backend = llama_backend
        self._phases.import_s = time.perf_counter() - started

        started = time.perf_counter()
        path = str(self._model.path)
        model = llama_backend.Model(path, self.settings.n_gpu_layers)
        self._context = llama_backend.Context(
            model, self.settings.n_ctx, self.settings.n_batch, self.settings.n_threads
        )
        if self.settings.prompt_cache_mb > 0:
            self._context.prefix_cache = PrefixStateCache(
                self.settings.prompt_cache_mb << 20, self.settings.prompt_cache_min_tokens
            )
        self._model_handle = model
        self._phases.load_s = time.perf_counter() - started
        self._chat_template = self._build_chat_template()
        log.info(
            "model loaded: %s (%d bytes) in %.3fs",
            path,
            self._model.size_bytes,
            self._phases.load_s,
        )

    def _build_chat_template(self) -> ChatTemplate | None:
        source = self._model_handle.metadata(CHAT_TEMPLATE_KEY)
        if not source:
            return None
        model = self._model_handle
        return ChatTemplate(source, model.special_text("bos"), model.special_text("eos"))

    def _warm_up_on_engine_thread(self) -> None:
        if self._state is not EngineState.READY:
            return
        started = time.perf_counter()
        # One real evaluation: touches every weight page and allocates compute buffers, so the
        # first request pays neither.
        tokens = self._model_handle.tokenize(WARMUP_PROMPT, add_special=True, parse_special=False)
        self._context.evaluate_prompt(tokens)
        self._context.reset()
        self._phases.warmup_s = time.perf_counter() - started
        self._set_state(EngineState.WARM)
        log.info("model warm in %.3fs", self._phases.warmup_s)

    def _submit(self, job: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((job, future))
        return future

    # ----------------------------------------------------------------- prompts

    def chat_prompt(self, messages: list[dict[str, Any]]) -> tuple[list[int], tuple[str, ...]]:
        """Render messages with the model's chat template; return (tokens, extra stop strings)."""
        self._ensure_usable()
        if self._chat_template is None:
            return self.tokenize(plain_prompt(messages), add_bos=True), ("\nuser:",)
        try:
            text = self._chat_template.render(messages)
        except TemplateError as exc:
            raise InvalidRequest(
                f"messages could not be rendered by the model's chat template: {exc}",
                param="messages",
            ) from None
        return self.tokenize(text, add_bos=True, special=True), ()

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Tokens of `text` (read-only vocabulary access: safe off the engine thread)."""
        self._ensure_usable()
        return self._model_handle.tokenize(text, add_special=add_bos, parse_special=special)

    def check_fits(self, prompt_tokens: int, max_tokens: int | None, param: str) -> int:
        """Return the completion budget, or raise `context_length_exceeded`."""
        n_ctx = self.settings.n_ctx
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
        return min(
            room, max_tokens if max_tokens is not None else room, self.settings.max_tokens_cap
        )

    def _ensure_usable(self) -> None:
        if self._context is None:
            raise ModelNotReady(f"model not loaded ({self._state.value})", retry_after_s=2)

    # ----------------------------------------------------------------- generation

    def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        deadline: float | None = None,
        streaming: bool = True,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Queue a generation; iterate the returned object for text pieces as they are decoded
        (`streaming`) or all at once at the end. Setting `cancel` stops it at the next token."""
        self._ensure_usable()
        generation = Generation(streaming=streaming)
        if cancel is not None:
            generation._cancel = cancel
        generation.result.prompt_tokens = len(prompt)
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
        self, prompt: list[int], params: SamplingParams, deadline: float | None, out: Generation
    ) -> None:
        model, context, result = self._model_handle, self._context, out.result
        if self._state is EngineState.READY:
            self._set_state(EngineState.WARM)  # the first real request warms the model
        result.finish_reason = "length"
        if params.max_tokens <= 0 or _past(deadline):
            result.interrupted = _past(deadline)
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
            ),
            model.n_vocab,
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        hit_stop = False
        started = time.perf_counter()
        try:
            context.evaluate_prompt(prompt)
            token = sampler.sample(context)
            first_at = time.perf_counter()
            result.time_to_first_token_s = first_at - started
            while True:
                if model.is_end_of_generation(token):
                    result.finish_reason = "stop"
                    break
                result.completion_tokens += 1
                text, hit_stop = stops.feed(decoder.decode(model.piece(token)))
                if text:
                    out.emit(text)
                if hit_stop:
                    result.finish_reason = "stop"
                    break
                if result.completion_tokens >= params.max_tokens:
                    break
                if out._cancel.is_set() or _past(deadline):
                    result.interrupted = True
                    break
                context.append(token)
                token = sampler.sample(context)
        finally:
            sampler.close()
        if not hit_stop:
            tail, hit_stop = stops.feed(decoder.decode(b"", final=True))
            tail += "" if hit_stop else stops.flush()
            if tail:
                out.emit(tail)
        if result.completion_tokens > 1:
            elapsed = time.perf_counter() - first_at
            result.decode_tokens_per_s = (
                (result.completion_tokens - 1) / elapsed if elapsed else None
            )

    # ----------------------------------------------------------------- embeddings

    def embed(
        self, texts: list[str], deadline: float | None = None
    ) -> tuple[list[list[float]], int]:
        """Normalised embedding vectors and the token count, computed on the engine thread."""
        self._ensure_usable()
        batches = []
        for i, text in enumerate(texts):
            tokens = self.tokenize(text, add_bos=True)
            if len(tokens) > self.settings.n_ctx:
                raise ContextLengthExceeded(
                    f"input[{i}] has {len(tokens)} tokens; the maximum is {self.settings.n_ctx}",
                    param="input",
                )
            batches.append(tokens)
        future = self._submit(lambda: self._embed_on_engine_thread(batches))
        timeout = None if deadline is None else max(0.1, deadline - time.monotonic())
        return future.result(timeout=timeout)

    def _embed_on_engine_thread(self, batches: list[list[int]]) -> tuple[list[list[float]], int]:
        if self._embedder is None:
            # A second context on the same model: the weights are shared, only the embedding
            # context's buffers are new. Built on first use, never at init.
            self._embedder = self._backend.Context(
                self._model_handle,
                self.settings.n_ctx,
                self.settings.n_ctx,
                self.settings.n_threads,
                embeddings=True,
            )
        vectors = [self._embedder.embed(tokens) for tokens in batches]
        return vectors, sum(len(t) for t in batches)


def lazy_mmap_active() -> bool:
    """Whether the lazy_mmap shim (no MAP_POPULATE on model mappings) is loaded in this process."""
    try:
        with open("/proc/self/maps") as maps:
            return any("liblazy_mmap" in line for line in maps)
    except OSError:
        return False


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline
