"""The FastAPI app, built from the route table: OpenAPI schema, OpenAI error objects for every
failure, SSE streaming. Used by the HTTP server and, after the cold invoke, under Mangum."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from handler.deadline import Deadline
from handler.errors import APIError, InternalError, MethodNotAllowed, NotFound, PayloadTooLarge
from handler.service.chunk_stream import ChunkStream
from handler.service.health import Reply
from handler.service.openai_service import OpenAIService
from handler.web.dispatch import Dispatcher
from handler.web.http import SSE_HEADERS, invalid_request, render_json, scope_deadline
from handler.web.routes import ROUTES, Call, Result, Route

log = logging.getLogger("coldstart.api")


def error_response(error: APIError) -> Response:
    """An OpenAI error object with the error's status and headers, rendered by `render_json`
    (which escapes what JSONResponse cannot encode: a message echoing an unpaired surrogate)."""
    return Response(
        render_json(error.body()),
        status_code=error.status,
        headers=error.headers(),
        media_type="application/json",
    )


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
    """Server-sent events from a ChunkStream, produced on the dispatcher's pool (not anyio's
    shared thread limiter) and closed when the response ends for any reason (a client that
    hangs up included), so its generation stops and its admission ticket is freed."""

    def __init__(self, chunks: ChunkStream, dispatcher: Dispatcher) -> None:
        super().__init__(
            dispatcher.sse(chunks), media_type="text/event-stream", headers=SSE_HEADERS
        )
        self._chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._chunks.close()


def to_response(result: Result, dispatcher: Dispatcher) -> Response | dict[str, Any]:
    """A route's result as FastAPI returns it."""
    if isinstance(result, ChunkStream):
        return SSEResponse(result, dispatcher)
    if isinstance(result, Reply):
        if isinstance(result.content, str):
            return Response(
                result.content,
                status_code=result.status,
                headers=result.headers,
                media_type=result.media_type,
            )
        return JSONResponse(result.content, status_code=result.status, headers=result.headers)
    return result


def create_app(service: OpenAIService, watch_disconnect: bool = False) -> FastAPI:
    """The FastAPI app of the route table around `service`, whose engine the caller owns.

    `watch_disconnect` (server mode) cancels a generation when its client hangs up; under
    Mangum there is no connection to watch.
    """
    app = FastAPI(title="coldstart", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.service = service
    settings = service.settings
    dispatcher = Dispatcher(service, settings, watch_disconnect)
    for route in ROUTES:
        dependencies = [Depends(_authenticator(dispatcher, route))] if route.authenticated else []
        app.add_api_route(
            route.path,
            _endpoint(dispatcher, route),
            methods=[route.method],
            name=route.name,
            dependencies=dependencies,
            response_model=None,
        )
    _add_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    return app


def _authenticator(
    dispatcher: Dispatcher, route: Route
) -> Callable[[Request], Coroutine[Any, Any, None]]:
    # async: FastAPI runs a plain function dependency on anyio's shared 40-thread limiter, where
    # it would wait behind whatever else is there; the check itself is a constant-time compare.
    async def authenticate(request: Request) -> None:
        dispatcher.authenticate(route, request.headers.get("authorization"))

    return authenticate


Endpoint = Callable[..., Coroutine[Any, Any, Response | dict[str, Any]]]


def _endpoint(dispatcher: Dispatcher, route: Route) -> Endpoint:
    """An endpoint whose signature FastAPI reads: the request, path parameters as strings, and
    the body as the route's schema (so validation and the OpenAPI schema come from it)."""

    async def endpoint(request: Request, **kwargs: Any) -> Response | dict[str, Any]:
        body = kwargs.pop("body", None)
        call = Call(body, dict(request.path_params), _deadline(request, dispatcher))
        return to_response(await dispatcher.run(route, call, request.receive), dispatcher)

    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [inspect.Parameter("request", keyword, annotation=Request)]
    parameters += [
        inspect.Parameter(name, keyword, annotation=str) for name in _path_parameters(route.path)
    ]
    if route.schema is not None:
        parameters.append(inspect.Parameter("body", keyword, annotation=route.schema))
    endpoint.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    endpoint.__name__ = route.name
    return endpoint


def _deadline(request: Request, dispatcher: Dispatcher) -> Deadline:
    return scope_deadline(request.scope, dispatcher.settings)


def _path_parameters(template: str) -> list[str]:
    return [part[1:-1].split(":")[0] for part in template.split("/") if part.startswith("{")]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(invalid_request(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(NotFound(f"Unknown route: {request.method} {request.url.path}"))
        if exc.status_code == 405:
            return error_response(
                MethodNotAllowed(f"Method {request.method} not allowed on {request.url.path}")
            )
        return error_response(APIError(str(exc.detail), status=exc.status_code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(InternalError("internal error"))
