"""The plain ASGI app: every route of the table without importing FastAPI.

Importing FastAPI costs about 0.25 s on this machine kind (mostly building its OpenAPI models),
more than the whole model load, and a cold Lambda pays it before its first answer. This app serves
the same route table with the same validation, auth, limits and error objects (a differential
test keeps the two apps in step), so the cold invoke never waits for FastAPI. A request it does
not speak (a body that is not JSON) goes to `fallback`, the FastAPI app, built on first need.

`python -m handler serve` runs it too (`watch_disconnect`): a request then costs our process
less CPU than through FastAPI (bench/RESULTS.md, "The plain app behind serve"), the server starts
without importing FastAPI, and a stream's lines come from the dispatcher's pool and stop when the
client hangs up.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from handler.config import Settings
from handler.errors import APIError, InternalError, PayloadTooLarge
from handler.service.chunk_stream import ChunkStream
from handler.service.health import Reply
from handler.service.openai_service import OpenAIService
from handler.web.dispatch import Dispatcher, until_disconnect
from handler.web.http import SSE_HEADERS, render_json, sse_lines
from handler.web.loop_lag import LoopLag
from handler.web.routes import Result, resolve

log = logging.getLogger("coldstart.api")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_TYPES = (b"", b"application/json")
_SSE_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    *((k.lower().encode(), v.encode()) for k, v in SSE_HEADERS.items()),
)


class LazyFastAPI:
    """The FastAPI app of `service`, imported and built on the first call, once, from any thread;
    `app` is None until then. A plain app's fallback (`python -m handler serve`, Lambda)."""

    def __init__(self, service: OpenAIService, watch_disconnect: bool = False) -> None:
        self.service = service
        self.watch_disconnect = watch_disconnect
        self.app: ASGIApp | None = None
        self._lock = threading.Lock()

    def __call__(self) -> ASGIApp:
        if self.app is None:
            with self._lock:
                if self.app is None:
                    from handler.web.fastapi_app import create_app

                    # FastAPI's own ASGI types (MutableMapping scopes) are wider than ours.
                    built: Any = create_app(self.service, watch_disconnect=self.watch_disconnect)
                    self.app = built
        return self.app


class PlainApp:
    """An ASGI app over the route table; `fallback` answers what it does not speak."""

    def __init__(
        self,
        service: OpenAIService,
        settings: Settings,
        fallback: Callable[[], ASGIApp] | None = None,
        watch_disconnect: bool = False,
        loop_lag: LoopLag | None = None,
    ) -> None:
        self.settings = settings
        self.dispatcher = Dispatcher(service, settings, watch_disconnect)
        self._fallback = fallback
        self._loop_lag = loop_lag
        if loop_lag is not None:
            service.metrics.watch(
                "event_loop_lag_seconds", "how late the serving loop woke (Seconds)", loop_lag
            )

    def speaks(self, scope: Scope) -> bool:
        """HTTP with a JSON body, or none: what this app parses itself."""
        if scope["type"] != "http" or self._fallback is None:
            return bool(scope["type"] == "http")
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        return content_type in JSON_TYPES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._loop_lag is not None:
            self._loop_lag.start()  # on the serving loop (lifespan startup, or the first request)
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if not self.speaks(scope):
            if self._fallback is None:
                return  # websockets: nothing to do
            # On a thread: building the FastAPI app imports it (0.25 s), which would stall
            # every stream on this loop meanwhile.
            fallback = await asyncio.to_thread(self._fallback)
            await fallback(scope, receive, send)
            return
        try:
            result = await self._serve(scope, receive)
        except APIError as exc:
            await _send_json(send, exc.status, exc.body(), exc.headers())
            return
        except Exception:
            log.exception("unexpected error")
            error = InternalError("internal error")
            await _send_json(send, error.status, error.body())
            return
        if isinstance(result, ChunkStream) and self.dispatcher.watch_disconnect:
            try:
                await _serve_sse(send, receive, self.dispatcher.sse(result))
            finally:
                result.close()
            return
        await _send_result(send, result)

    async def _serve(self, scope: Scope, receive: Receive) -> Result:
        route, params = resolve(scope["method"], scope["path"])
        body = await self._read_body(receive)
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization")
        self.dispatcher.authenticate(
            route, authorization.decode("latin-1") if authorization else None
        )
        call = self.dispatcher.call(route, scope, params, body)
        return await self.dispatcher.run(route, call, receive)

    async def _read_body(self, receive: Receive) -> bytes:
        limit = self.settings.max_request_bytes
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is larger than {limit} bytes")
            parts.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(parts)


async def _send_result(send: Send, result: Result) -> None:
    if isinstance(result, ChunkStream):
        try:
            await _send_sse(send, sse_lines(result))
        finally:
            result.close()
    elif isinstance(result, Reply):
        if isinstance(result.content, str):
            body = result.content.encode()
            await _send(send, result.status, body, result.media_type, result.headers)
        else:
            await _send_json(send, result.status, result.content, result.headers)
    else:
        await _send_json(send, 200, result)


async def _send_json(
    send: Send, status: int, content: Any, extra_headers: dict[str, str] | None = None
) -> None:
    await _send(send, status, render_json(content), "application/json", extra_headers)


async def _send(
    send: Send, status: int, body: bytes, media_type: str, extra_headers: dict[str, str] | None
) -> None:
    # Header order and charset as Starlette's Response renders them, so both apps agree.
    if media_type.startswith("text/") and "charset" not in media_type:
        media_type += "; charset=utf-8"
    headers = [(b"content-length", str(len(body)).encode()), (b"content-type", media_type.encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _serve_sse(send: Send, receive: Receive, lines: AsyncIterator[str]) -> None:
    """A stream to an HTTP client (server mode): lines as the dispatcher's pool makes them,
    stopped as soon as the client hangs up, even while no line is due (a long prompt)."""
    sending = asyncio.ensure_future(_send_sse_lines(send, lines))
    hung_up = asyncio.ensure_future(until_disconnect(receive))
    try:
        await asyncio.wait((sending, hung_up), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sending, hung_up):
            task.cancel()
        # The lines' generator closes its stream once cancelled; wait for that, keep errors.
        await asyncio.gather(sending, hung_up, return_exceptions=True)
    error = None if sending.cancelled() else sending.exception()
    if error is not None:
        raise error


async def _lifespan(receive: Receive, send: Send) -> None:
    """ASGI lifespan, answered here (nothing to set up beyond the loop timer, started by the
    caller): handing it to the fallback would build FastAPI for nothing."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send_sse_lines(send: Send, lines: AsyncIterator[str]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": list(_SSE_HEADERS)})
    async for line in lines:
        await send({"type": "http.response.body", "body": line.encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _send_sse(send: Send, lines: Iterator[str]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": list(_SSE_HEADERS)})
    for line in lines:
        await send({"type": "http.response.body", "body": line.encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b""})
