"""The Lambda application: routes each event to Mangum, the keep-warm ping or a direct route.

Every invocation, buffered (awslambdaric or our loop) or streamed (our loop), goes through
`invoke()` or `stream()`, which share the per-invoke bookkeeping (cold flag, metrics, log line).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from handler import deadline as deadlines
from handler.aws_lambda.events import HTTP_KINDS, KEEP_WARM_INPUT, EventKind, classify
from handler.config import Settings
from handler.engine import InferenceEngine
from handler.errors import APIError, InternalError, InvalidRequest
from handler.service.openai_service import OpenAIService
from handler.telemetry import Invocation, Metrics, invocation_scope, log_fields
from handler.web.http import parse_body, render_json
from handler.web.plain_app import ASGIApp, LazyFastAPI, PlainApp
from handler.web.routes import Call, direct_route

if TYPE_CHECKING:
    from handler.aws_lambda.streaming import ChunkSink

log = logging.getLogger("coldstart.lambda")

UNSUPPORTED_EVENT = (
    "unrecognised event: expected a function URL, API Gateway or ALB event, a scheduled event "
    f"(EventBridge rule or Scheduler) or the keep-warm input {json.dumps(KEEP_WARM_INPUT)}, "
    "or an OpenAI request body (messages, prompt or input)"
)

# The invoke log line's token counts, from the metrics the service recorded for the invocation.
TOKEN_FIELDS = {"prompt_tokens": "PromptTokens", "completion_tokens": "CompletionTokens"}

PHASE_METRICS = {
    "resolve_s": "ResolveDuration",
    "import_s": "ImportDuration",
    "load_s": "LoadDuration",
    "warmup_s": "WarmupDuration",
}


class LambdaApp:
    """Routes one Lambda event to Mangum, the keep-warm ping, or a direct route."""

    def __init__(
        self, engine: InferenceEngine, settings: Settings, init_s: float | None = None
    ) -> None:
        from mangum import Mangum

        self.engine = engine
        self.settings = settings
        self.metrics = Metrics(function_name=settings.aws_lambda_function_name)
        self.service = OpenAIService(engine, settings, self.metrics)
        self.init_s = init_s
        self.cold = True
        self.restore_s: float | None = None  # set by a SnapStart restore until its first invoke
        self._phases_reported: set[str] = set()
        self._cold_lock = threading.Lock()
        # The plain app serves the cold invoke; FastAPI is built after it, off the request path.
        self._full_app = LazyFastAPI(self.service)
        self.plain_app = PlainApp(self.service, settings, fallback=self._full_app)
        # lifespan="off": Mangum would run the ASGI lifespan on every invocation.
        self.mangum = Mangum(self.asgi, lifespan="off")

    # ------------------------------------------------------------- the ASGI app

    async def asgi(self, scope: Any, receive: Any, send: Any) -> None:
        """The FastAPI app once it is built, else the plain app (same routes, same answers)."""
        app = self._full_app.app or self.plain_app
        await app(scope, receive, send)

    def full_app(self) -> ASGIApp:
        """The FastAPI app, imported and built once (thread-safe)."""
        return self._full_app()

    def _build_full_app_in_background(self) -> None:
        if self._full_app.app is None:
            threading.Thread(target=self.full_app, name="coldstart-app-import", daemon=True).start()

    # ------------------------------------------------------------- invocations

    def __call__(self, event: Any, context: Any) -> Any:
        """awslambdaric's handler: one buffered invocation."""
        return self.invoke(event, context)

    def invoke(self, event: Any, context: Any) -> Any:
        """Answer one event with one JSON value."""
        kind = classify(event)
        with invocation_scope(_request_id(context)) as invocation:
            started, cold = self._begin()
            try:
                if kind in HTTP_KINDS:
                    try:
                        return self.mangum(event, context)
                    except UnicodeEncodeError:
                        return undecodable_http_event(kind)
                if kind is EventKind.KEEP_WARM:
                    return self.keep_warm(context)
                if kind is EventKind.DIRECT:
                    return self.direct(event, context)
                return InvalidRequest(UNSUPPORTED_EVENT, code="unsupported_event").body()
            finally:
                self._end(kind, started, cold, invocation)

    def stream(
        self,
        event: Any,
        context: Any,
        open_sink: Callable[[], ChunkSink],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Answer one HTTP event by streaming the response into the sink `open_sink` opens.

        Raises only while nothing was sent (the caller may still report an error then).
        """
        from handler.aws_lambda.streaming import StreamingCycle

        kind = classify(event)
        with invocation_scope(_request_id(context)) as invocation:
            started, cold = self._begin()
            try:
                # The same ASGI app and event translation as the buffered Mangum path.
                try:
                    request = self.mangum.infer(event, context)
                    scope, body = request.scope, request.body  # encoded here, lazily
                except UnicodeEncodeError:
                    send_undecodable(open_sink())
                    return
                cycle = StreamingCycle(scope, body, open_sink)
                loop.run_until_complete(cycle.run(self.asgi))
            finally:
                self._end(kind, started, cold, invocation)

    def keep_warm(self, context: Any) -> dict[str, Any]:
        """A schedule's ping (`events.is_keep_warm`): load and warm the model, report the
        state. No HTTP shape."""
        try:
            status = self.engine.warm_up(self._deadline(context))
        except APIError as exc:
            status = self.engine.status()
            return {"ok": False, **status.as_dict(), "error": exc.message}
        return {"ok": True, **status.as_dict()}

    def direct(self, event: dict[str, Any], context: Any) -> Any:
        """A direct invoke whose payload is an OpenAI request body; returns the response body."""
        route = direct_route(event)
        try:
            if route is None or route.schema is None:
                raise InvalidRequest("not a direct request: expected messages, prompt or input")
            if event.get("stream"):
                raise InvalidRequest(
                    "stream is not available on direct invoke; call the function URL",
                    param="stream",
                )
            call = Call(parse_body(route.schema, event), {}, self._deadline(context))
            return route.handle(self.service, call)
        except APIError as exc:
            return exc.body()
        except Exception:
            log.exception("direct invoke failed")
            return InternalError("internal error").body()

    def _deadline(self, context: Any) -> deadlines.Deadline:
        return deadlines.from_context(context, self.settings.deadline_margin_ms)

    # ------------------------------------------------------------- bookkeeping

    def restored(self, duration_s: float) -> None:
        """A SnapStart restore happened: the next invoke is this copy's cold start."""
        with self._cold_lock:
            self.cold = True
            self.restore_s = duration_s

    def _begin(self) -> tuple[float, bool]:
        """(start time, whether this is the environment's first invocation)."""
        with self._cold_lock:
            cold, self.cold = self.cold, False
        return time.perf_counter(), cold

    def _end(self, kind: EventKind, started: float, cold: bool, invocation: Invocation) -> None:
        """Metrics and log line for one invoke; after the cold one, build FastAPI off-path."""
        elapsed = time.perf_counter() - started
        self._emit_metrics(cold, elapsed)
        if cold:
            self._build_full_app_in_background()
        tokens = {
            field_name: int(invocation.totals[metric])
            for field_name, metric in TOKEN_FIELDS.items()
            if metric in invocation.totals
        }
        log_fields(
            log,
            "invoke",
            kind=kind.value,
            cold=cold,
            state=self.engine.state.value,
            duration_ms=round(elapsed * 1000, 1),
            **tokens,
        )

    def _emit_metrics(self, cold: bool, invocation_s: float) -> None:
        """One EMF line per invoke: cold-start phases once, then request metrics."""
        self.metrics.record("ColdStart", 1.0 if cold else 0.0)
        self.metrics.record("InvocationDuration", invocation_s)
        status = self.engine.status()
        if cold and self.restore_s is not None:
            # Init and its phases ran when the snapshot was taken, not in this environment.
            self.metrics.record_many({"Restore": 1.0, "RestoreDuration": self.restore_s})
            self.restore_s = None
            self._phases_reported.update(PHASE_METRICS.values())
        elif cold:
            self.metrics.record("InitDuration", self.init_s)
        phases = status.phases.as_dict()
        for field_name, metric in PHASE_METRICS.items():
            value = phases.get(field_name)
            if value is not None and metric not in self._phases_reported:
                self._phases_reported.add(metric)
                self.metrics.record(metric, value)
        self.metrics.record("QueueDepth", status.queue_depth)
        self.metrics.flush_emf()


def _request_id(context: Any) -> str:
    """The invocation's request id, as the LambdaContext of either runtime carries it."""
    return str(getattr(context, "aws_request_id", "") or "")


def _undecodable_error() -> InvalidRequest:
    return InvalidRequest(
        "the event's path, query string, headers or body hold text that is not valid UTF-8 "
        "(an unpaired surrogate)",
        code="invalid_encoding",
    )


def undecodable_http_event(kind: EventKind) -> dict[str, Any]:
    """The 400 for an HTTP event whose strings Mangum cannot encode (unpaired surrogates)."""
    error = _undecodable_error()
    response: dict[str, Any] = {
        "statusCode": error.status,
        "headers": {"content-type": "application/json"},
        "body": render_json(error.body()).decode(),
        "isBase64Encoded": False,
    }
    if kind is EventKind.ALB:
        response["statusDescription"] = "400 Bad Request"
    return response


def send_undecodable(sink: ChunkSink) -> None:
    """The same 400 as a streamed response (prelude, then the body)."""
    from handler.aws_lambda.streaming import prelude

    error = _undecodable_error()
    sink.write(prelude(error.status, [(b"content-type", b"application/json")]))
    sink.write(render_json(error.body()))
    sink.close()
