"""The Lambda application: routes events, and the init sequence that builds it.

`init()` starts the model load on the engine thread first, then imports the web stack while the
mmap load runs, then waits for the load only as long as INIT_BUDGET_S allows; a slower load
continues in the background and the first invoke waits for it within its own remaining time.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from handler.config import ConfigError, Settings, load_settings
from handler.engine import Engine, EngineState
from handler.engines import create_engine
from handler.errors import APIError, InternalError, InvalidRequest
from handler.events import DIRECT_KINDS, HTTP_KINDS, EventKind, classify
from handler.telemetry import Metrics

log = logging.getLogger("coldstart.lambda")

PHASE_METRICS = {
    "resolve_s": "ResolveDuration",
    "import_s": "ImportDuration",
    "load_s": "LoadDuration",
    "warmup_s": "WarmupDuration",
}


class InitError(RuntimeError):
    """Init cannot succeed; the message is the one line Lambda reports."""


class LambdaApp:
    """Routes one Lambda event to Mangum, the keep-warm ping, or the OpenAI service."""

    def __init__(self, engine: Engine, settings: Settings, init_s: float | None = None) -> None:
        from mangum import Mangum

        from handler.cold_lane import ColdLane
        from handler.openai_service import OpenAIService

        self.engine = engine
        self.settings = settings
        self.metrics = Metrics(function_name=settings.aws_lambda_function_name)
        self.service = OpenAIService(engine, settings, self.metrics)
        self.init_s = init_s
        self._phases_reported: set[str] = set()
        # FastAPI is imported after the first invoke (or when a request needs it): see cold_lane.
        self.cold_lane = ColdLane(self.service, settings, self._build_app)
        # lifespan="off": Mangum would run the ASGI lifespan on every invocation.
        self.mangum = Mangum(self.cold_lane, lifespan="off")
        self.cold = True

    def _build_app(self) -> Any:
        from handler.api import create_app

        return create_app(self.engine, self.settings, self.metrics, self.service)

    @property
    def app(self) -> Any:
        """The FastAPI app (imported and built on first use)."""
        return self.cold_lane.full_app()

    def __call__(self, event: Any, context: Any) -> Any:
        kind = classify(event)
        started, cold = self.begin_invocation()
        try:
            if kind in HTTP_KINDS:
                return self.mangum(event, context)
            if kind is EventKind.KEEP_WARM:
                return self.keep_warm(context)
            if kind in DIRECT_KINDS:
                return self.direct(kind, event, context)
            return InvalidRequest(
                "unrecognised event: expected a function URL, API Gateway, ALB, EventBridge "
                "scheduled event, or an OpenAI request body (messages, prompt or input)",
                code="unsupported_event",
            ).body()
        finally:
            self.end_invocation(kind, started, cold)

    def begin_invocation(self) -> tuple[float, bool]:
        """Start the per-invoke bookkeeping: (start time, whether this is the cold invoke)."""
        cold, self.cold = self.cold, False
        return time.perf_counter(), cold

    def end_invocation(self, kind: EventKind, started: float, cold: bool) -> None:
        """Metrics and log line for one invoke; after the cold one, build FastAPI off-path."""
        elapsed = time.perf_counter() - started
        self._emit_metrics(cold, elapsed)
        if cold:
            self.cold_lane.build_full_app_in_background()
        log.info(
            "invoke kind=%s cold=%s state=%s duration_ms=%.1f",
            kind.value,
            cold,
            self.engine.state.value,
            elapsed * 1000,
        )

    def _emit_metrics(self, cold: bool, invocation_s: float) -> None:
        """One EMF line per invoke: cold-start phases once, then request metrics."""
        self.metrics.record("ColdStart", 1.0 if cold else 0.0)
        self.metrics.record("InvocationDuration", invocation_s)
        if cold:
            self.metrics.record("InitDuration", self.init_s)
        status = self.engine.status()
        phases = vars(status.phases)
        for field_name, metric in PHASE_METRICS.items():
            value = phases.get(field_name)
            if value is not None and metric not in self._phases_reported:
                self._phases_reported.add(metric)
                self.metrics.record(metric, value)
        self.metrics.record("QueueDepth", status.queue_depth)
        self.metrics.flush_emf()

    def keep_warm(self, context: Any) -> dict[str, Any]:
        """EventBridge ping: load and warm the model, report the state. No HTTP shape."""
        try:
            status = self.engine.warm_up(self._deadline(context))
        except APIError as exc:
            status = self.engine.status()
            return {"ok": False, **status.as_dict(), "error": exc.message}
        return {"ok": True, **status.as_dict()}

    def direct(self, kind: EventKind, event: dict[str, Any], context: Any) -> dict[str, Any]:
        """A direct invoke whose payload is an OpenAI request body; returns the response body."""
        from pydantic import ValidationError

        from handler.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

        deadline = self._deadline(context)
        try:
            if event.get("stream"):
                raise InvalidRequest(
                    "stream is not available on direct invoke; call the function URL",
                    param="stream",
                )
            if kind is EventKind.DIRECT_CHAT:
                return self.service.chat(ChatCompletionRequest.model_validate(event), deadline)
            if kind is EventKind.DIRECT_COMPLETION:
                return self.service.completion(CompletionRequest.model_validate(event), deadline)
            return self.service.embeddings(EmbeddingRequest.model_validate(event), deadline)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            return InvalidRequest(f"{param}: {first['msg']}", param=param).body()
        except APIError as exc:
            return exc.body()
        except Exception:
            log.exception("direct invoke failed")
            return InternalError("internal error").body()

    def _deadline(self, context: Any) -> float | None:
        from handler.openai_service import monotonic_deadline

        remaining = getattr(context, "get_remaining_time_in_millis", None)
        return monotonic_deadline(
            remaining() if remaining else None, self.settings.deadline_margin_ms
        )


def configure_logging(level: str) -> None:
    """Our loggers at `level`; reuse the runtime's root handler when there is one."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("coldstart").setLevel(level.upper())


def init(started: float, settings: Settings | None = None) -> LambdaApp:
    """Lambda init: start the load, build the app meanwhile, wait within INIT_BUDGET_S.

    `started` is the `time.perf_counter()` reading taken when init began.
    """
    try:
        settings = settings or load_settings()
    except ConfigError as exc:
        raise InitError(str(exc)) from None
    configure_logging(settings.log_level)
    engine = create_engine(settings)
    engine.start()  # the mmap load overlaps the web-stack imports below
    lambda_app = LambdaApp(engine, settings)
    remaining = settings.init_budget_s - (time.perf_counter() - started)
    state = engine.wait_loaded(max(0.0, remaining))
    lambda_app.init_s = time.perf_counter() - started
    if state is EngineState.FAILED:
        raise InitError(engine.status().reason or "model failed to load")
    if state is EngineState.LOADING:
        log.warning(
            "model still loading after %.1fs; continuing in the background", settings.init_budget_s
        )
    log.info("init done in %.3fs, state=%s", time.perf_counter() - started, state.value)
    return lambda_app
