"""The FastAPI app: OpenAI routes, health and readiness, OpenAI error objects for every failure."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from handler.config import Settings
from handler.engine import LOADED_STATES, Engine, EngineState
from handler.errors import (
    APIError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)
from handler.http_common import (
    SSE_HEADERS,
    check_api_key,
    invalid_request,
    scope_deadline,
    sse_lines,
)
from handler.openai_service import ChunkStream, OpenAIService
from handler.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from handler.telemetry import Metrics

log = logging.getLogger("coldstart.api")


def error_response(error: APIError) -> JSONResponse:
    """An OpenAI error object with the error's status and headers."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


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


class SSEResponse(StreamingResponse):
    """Server-sent events from a ChunkStream, closed when the response ends for any reason
    (a client that hangs up included), so its generation stops and its slot is freed."""

    def __init__(self, chunks: ChunkStream) -> None:
        super().__init__(sse_lines(chunks), media_type="text/event-stream", headers=SSE_HEADERS)
        self._chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._chunks.close()


async def call_service(request: Request, watch_disconnect: bool, fn: Any, *args: Any) -> Any:
    """Run a blocking service call off the event loop with a cancel event as its last argument;
    with `watch_disconnect`, a client that hangs up sets it, so the generation stops instead of
    running on to max_tokens for nobody."""
    if not watch_disconnect:
        return await run_in_threadpool(fn, *args, None)
    cancel = threading.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancel.set()

    watcher = asyncio.ensure_future(watch())
    try:
        return await run_in_threadpool(fn, *args, cancel)
    finally:
        watcher.cancel()


def create_app(
    engine: Engine,
    settings: Settings,
    metrics: Metrics | None = None,
    service: OpenAIService | None = None,
    watch_disconnect: bool = False,
) -> FastAPI:
    """Build the app around an engine that the caller owns (and loads).

    `watch_disconnect` (server mode) cancels a generation when its client hangs up; under
    Mangum there is no connection to watch.
    """
    service = service or OpenAIService(engine, settings, metrics)
    app = FastAPI(title="coldstart", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.service = service

    def authenticate(request: Request) -> None:
        check_api_key(settings, request.headers.get("authorization"))

    def deadline(request: Request) -> float | None:
        return scope_deadline(request.scope, settings)

    authed = [Depends(authenticate)]

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_request(exc.errors()))

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

    async def call(request: Request, fn: Any, *args: Any) -> Any:
        return await call_service(request, watch_disconnect, fn, *args)

    @app.post("/v1/chat/completions", dependencies=authed, response_model=None)
    async def chat_completions(
        request: Request, body: ChatCompletionRequest, until: float | None = Depends(deadline)
    ) -> dict[str, Any] | SSEResponse:
        if body.stream:
            return SSEResponse(await run_in_threadpool(service.chat_stream, body, until))
        return await call(request, service.chat, body, until)  # type: ignore[no-any-return]

    @app.post("/v1/completions", dependencies=authed, response_model=None)
    async def completions(
        request: Request, body: CompletionRequest, until: float | None = Depends(deadline)
    ) -> dict[str, Any] | SSEResponse:
        if body.stream:
            return SSEResponse(await run_in_threadpool(service.completion_stream, body, until))
        return await call(request, service.completion, body, until)  # type: ignore[no-any-return]

    @app.post("/v1/embeddings", dependencies=authed)
    def embeddings(
        body: EmbeddingRequest, until: float | None = Depends(deadline)
    ) -> dict[str, Any]:
        return service.embeddings(body, until)

    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    return app
