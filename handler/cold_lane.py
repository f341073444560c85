"""The cold lane: serves the generation routes while the FastAPI app is not imported yet.

Importing FastAPI costs about 0.25 s on this machine kind (mostly building its OpenAPI models),
more than the whole model load. A cold Lambda's first request is nearly always a completion, so
this small ASGI app answers POST /v1/chat/completions and /v1/completions with the same service,
validation, auth and error objects as the FastAPI routes (a differential test keeps the two in
step), and hands every other request to the FastAPI app, importing it on first need. After the
first invoke the FastAPI app is built in the background and takes over.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from pydantic import ValidationError

from handler.config import Settings
from handler.errors import APIError, InternalError, PayloadTooLarge
from handler.http_common import (
    SSE_HEADERS,
    check_api_key,
    invalid_request,
    scope_deadline,
    sse_lines,
)
from handler.openai_service import OpenAIService
from handler.schemas import ChatCompletionRequest, CompletionRequest

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ROUTES: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}
JSON_TYPES = (b"", b"application/json")


class ColdLane:
    """An ASGI app: generation routes served directly until the full app is ready."""

    def __init__(
        self, service: OpenAIService, settings: Settings, build_full_app: Callable[[], ASGIApp]
    ) -> None:
        self.service = service
        self.settings = settings
        self._build_full_app = build_full_app
        self._full_app: ASGIApp | None = None
        self._lock = threading.Lock()

    @property
    def full_app_ready(self) -> bool:
        """Whether requests now go to the FastAPI app."""
        return self._full_app is not None

    def full_app(self) -> ASGIApp:
        """The FastAPI app, built once (thread-safe)."""
        if self._full_app is None:
            with self._lock:
                if self._full_app is None:
                    self._full_app = self._build_full_app()
        return self._full_app

    def build_full_app_in_background(self) -> None:
        """Import and build the FastAPI app off the request path."""
        if self._full_app is None:
            threading.Thread(target=self.full_app, name="coldstart-app-import", daemon=True).start()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._full_app is None and self._handles(scope):
            await self._serve(scope, receive, send)
        else:
            await self.full_app()(scope, receive, send)

    def _handles(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ROUTES:
            return False
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        return content_type in JSON_TYPES

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        try:
            body = await self._read_body(receive)
            authorization = headers.get(b"authorization")
            check_api_key(self.settings, authorization.decode("latin-1") if authorization else None)
            schema = ROUTES[scope["path"]]
            try:
                request = schema.model_validate_json(body or b"null")
            except ValidationError as exc:
                raise invalid_request(exc.errors()) from None
            deadline = scope_deadline(scope, self.settings)
            if request.stream:
                chunks = self._stream(request, deadline)
                await _send_sse(send, sse_lines(chunks))
                return
            if isinstance(request, ChatCompletionRequest):
                result = self.service.chat(request, deadline)
            else:
                result = self.service.completion(request, deadline)
            await _send_json(send, 200, result)
        except APIError as exc:
            await _send_json(send, exc.status, exc.body(), exc.headers())
        except Exception:
            import logging

            logging.getLogger("coldstart.api").exception("unexpected error")
            error = InternalError("internal error")
            await _send_json(send, error.status, error.body())

    def _stream(
        self, request: ChatCompletionRequest | CompletionRequest, deadline: float | None
    ) -> Iterator[dict[str, Any]]:
        if isinstance(request, ChatCompletionRequest):
            return self.service.chat_stream(request, deadline)
        return self.service.completion_stream(request, deadline)

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


async def _send_json(
    send: Send, status: int, content: Any, extra_headers: dict[str, str] | None = None
) -> None:
    # Rendered exactly as Starlette's JSONResponse does, so both lanes return the same bytes.
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_sse(send: Send, lines: Iterator[str]) -> None:
    headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
    headers += [(k.lower().encode(), v.encode()) for k, v in SSE_HEADERS.items()]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for line in lines:
        await send({"type": "http.response.body", "body": line.encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b""})
