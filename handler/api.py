"""The FastAPI app: OpenAI routes, health and readiness, OpenAI error objects for every failure."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from handler.config import Settings
from handler.engine import LOADED_STATES, Engine, EngineState
from handler.errors import (
    APIError,
    AuthenticationFailed,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)
from handler.openai_service import OpenAIService, monotonic_deadline
from handler.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from handler.telemetry import Metrics

log = logging.getLogger("coldstart.api")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(error: APIError) -> JSONResponse:
    """An OpenAI error object with the error's status and headers."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def sse_lines(chunks: Iterator[dict[str, Any]]) -> Iterator[str]:
    """Server-sent events: one `data:` line per chunk, an error object if one fails, then [DONE]."""
    try:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    except Exception:
        log.exception("stream failed after the first chunk")
        yield f"data: {json.dumps(InternalError('generation failed').body())}\n\n"
    yield "data: [DONE]\n\n"


class BodySizeLimit:
    """Rejects request bodies over `limit` bytes with 413 before the app parses them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(f"request body is larger than {self.limit} bytes")
        await error_response(error)(scope, receive, send)


class _TooLarge(Exception):
    pass


def request_deadline(request: Request, settings: Settings) -> float | None:
    """Lambda's remaining time (via Mangum's `aws.context`) minus the margin, else no deadline."""
    context = request.scope.get("aws.context")
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    return monotonic_deadline(remaining() if remaining else None, settings.deadline_margin_ms)


def create_app(engine: Engine, settings: Settings, metrics: Metrics | None = None) -> FastAPI:
    """Build the app around an engine that the caller owns (and loads)."""
    service = OpenAIService(engine, settings, metrics)
    app = FastAPI(title="coldstart", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.service = service

    def check_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        expected = settings.api_key.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise AuthenticationFailed("Incorrect or missing API key (Authorization: Bearer ...)")

    def deadline(request: Request) -> float | None:
        return request_deadline(request, settings)

    authed = [Depends(check_api_key)]

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound(f"Unknown route: {request.method} {request.url.path}"))
        if exc.status_code == 405:
            return error_response(
                MethodNotAllowed(f"Method {request.method} not allowed on {request.url.path}")
            )
        return error_response(APIError(str(exc.detail), status=exc.status_code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(InternalError("internal error"))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness: the process answers; never touches the model."""
        return {"status": "ok", "state": engine.state.value}

    @app.get("/readyz")
    def readyz() -> Response:
        """Readiness: 200 once the model is loaded, else 503 with Retry-After and the state."""
        status = engine.status()
        body = status.as_dict()
        if status.state in LOADED_STATES:
            return JSONResponse(body)
        retry = "60" if status.reason else "1"
        return JSONResponse(body, status_code=503, headers={"Retry-After": retry})

    @app.get("/metrics")
    def metrics_text() -> Response:
        """Prometheus text: request metrics plus engine gauges."""
        status = engine.status()
        gauges = {
            "queue_depth": float(status.queue_depth),
            **{f"state_{s.value}": float(s is status.state) for s in EngineState},
            **{f"phase_{k}": v for k, v in vars(status.phases).items() if v is not None},
        }
        text = service.metrics.prometheus_text(gauges)
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=authed)
    def list_models() -> dict[str, Any]:
        return service.models()

    @app.get("/v1/models/{model_id:path}", dependencies=authed)
    def get_model(model_id: str) -> dict[str, Any]:
        return service.model(model_id)

    @app.post("/v1/chat/completions", dependencies=authed, response_model=None)
    def chat_completions(
        body: ChatCompletionRequest, until: float | None = Depends(deadline)
    ) -> dict[str, Any] | StreamingResponse:
        if body.stream:
            chunks = service.chat_stream(body, until)
            return StreamingResponse(
                sse_lines(chunks), media_type="text/event-stream", headers=SSE_HEADERS
            )
        return service.chat(body, until)

    @app.post("/v1/completions", dependencies=authed, response_model=None)
    def completions(
        body: CompletionRequest, until: float | None = Depends(deadline)
    ) -> dict[str, Any] | StreamingResponse:
        if body.stream:
            chunks = service.completion_stream(body, until)
            return StreamingResponse(
                sse_lines(chunks), media_type="text/event-stream", headers=SSE_HEADERS
            )
        return service.completion(body, until)

    @app.post("/v1/embeddings", dependencies=authed)
    def embeddings(
        body: EmbeddingRequest, until: float | None = Depends(deadline)
    ) -> dict[str, Any]:
        return service.embeddings(body, until)

    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    return app


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    """The first validation problem as a 400 naming the parameter."""
    errors = exc.errors()
    if not errors:
        return InvalidRequest("invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return InvalidRequest("request body is not valid JSON", code="invalid_json")
    if first.get("type") == "missing" and not loc:
        return InvalidRequest("request body is required")
    param = ".".join(loc) if loc else None
    message = first.get("msg", "invalid value")
    return InvalidRequest(f"{param}: {message}" if param else message, param=param)
