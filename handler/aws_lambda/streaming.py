"""One ASGI request cycle whose response goes to the Lambda Runtime API as it is produced.

Mangum's HTTP cycle buffers the body; this one writes it through: when the app starts its
response, the HTTP integration prelude that function URLs and API Gateway's streaming integration
read (status, headers and cookies as JSON, then 8 NUL bytes), then every body message as one
chunk. Running the real app keeps auth, validation and error objects identical to the buffered path.
States: request -> response (first byte sent) -> complete.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

log = logging.getLogger("coldstart.runtime")

DELIMITER = b"\0" * 8

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[Message]],
        Callable[[Message], Awaitable[None]],
    ],
    Awaitable[None],
]


class ErrorLike(Protocol):
    """What a mid-stream error needs to become trailers (`runtime_api.ErrorReport`)."""

    @property
    def error_type(self) -> str:
        """Lambda's error type."""
        ...

    @property
    def message(self) -> str:
        """One line."""
        ...


class ChunkSink(Protocol):
    """Where the response goes: `runtime_api.ResponseStream`, or a test's list."""

    def write(self, data: bytes) -> None:
        """Send one chunk now."""

    def close(self, error: Any = None) -> None:
        """End the response, with error trailers when `error` is given."""


class CycleState(enum.Enum):
    """Where the response is: nothing sent, first byte sent, or done."""

    REQUEST = enum.auto()
    RESPONSE = enum.auto()
    COMPLETE = enum.auto()


class StreamingCycle:
    """Runs the app once for `scope` and `body`, streaming the response into a sink.

    `open_sink` is called when the app starts its response, so an app that fails before that
    leaves nothing sent: `run()` then raises and the caller may still use the `/error` endpoint.
    A failure after the first byte ends the stream with error trailers instead.
    """

    def __init__(
        self, scope: MutableMapping[str, Any], body: bytes, open_sink: Callable[[], ChunkSink]
    ) -> None:
        self.scope = scope
        self.state = CycleState.REQUEST
        self.status: int | None = None
        self._open_sink = open_sink
        self._sink: ChunkSink | None = None
        self.sink_error: Exception | None = None
        self._request: Message | None = {"type": "http.request", "body": body, "more_body": False}
        self._complete = asyncio.Event()

    async def run(self, app: ASGIApp) -> None:
        """Run the app; raise only if it failed before sending anything."""
        from handler.aws_lambda.runtime_api import ErrorReport

        try:
            await app(self.scope, self.receive, self.send)
        except Exception as exc:
            if self.sink_error is not None:
                raise self.sink_error from None  # the Runtime API went away: no trailers to send
            if self.state is CycleState.REQUEST:
                raise
            if self.state is CycleState.COMPLETE:
                # Starlette re-raises after it has sent its 500 answer: the client has it.
                log.warning("app raised after a complete response: %r", exc)
                return
            log.exception("stream failed after the first byte")
            self._finish(ErrorReport.from_exception(exc))
            return
        if self.state is CycleState.REQUEST:
            raise RuntimeError("the app returned without a response")
        if self.state is CycleState.RESPONSE:
            self._finish(ErrorReport("Runtime.IncompleteResponse", "the app ended mid-response"))

    async def receive(self) -> Message:
        """The request body once; then wait, and report a disconnect once the response is sent."""
        if self._request is not None:
            message, self._request = self._request, None
            return message
        # Starlette's StreamingResponse listens for a disconnect while it streams (ASGI < 2.4):
        # answering at once would cancel the response.
        await self._complete.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        """Forward the app's messages: the prelude on start, each body message as a chunk."""
        kind = message["type"]
        if self.state is CycleState.REQUEST and kind == "http.response.start":
            self.status = int(message["status"])
            self._sink = self._guarded(self._open_sink)
            self.state = CycleState.RESPONSE
            self._write(prelude(self.status, message.get("headers") or []))
        elif self.state is CycleState.RESPONSE and kind == "http.response.body":
            self._write(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                self._finish(None)
        else:
            raise RuntimeError(f"unexpected ASGI message {kind} in state {self.state.name}")

    def _write(self, data: bytes) -> None:
        sink = self._sink
        assert sink is not None
        self._guarded(lambda: sink.write(data))

    def _finish(self, error: ErrorLike | None) -> None:
        self.state = CycleState.COMPLETE
        self._complete.set()
        sink = self._sink
        assert sink is not None
        self._guarded(lambda: sink.close(error))

    def _guarded(self, call: Callable[[], Any]) -> Any:
        # Remember a sink failure: the app may wrap it (task groups), run() must still see it.
        try:
            return call()
        except Exception as exc:
            self.sink_error = exc
            raise


def prelude(status: int, headers: list[tuple[bytes, bytes]] | list[list[bytes]]) -> bytes:
    """The HTTP integration response prelude: JSON status, headers, cookies, then 8 NUL bytes."""
    merged: dict[str, str] = {}
    cookies: list[str] = []
    for raw_name, raw_value in headers:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        if name == "set-cookie":
            cookies.append(value)
        elif name in merged:
            merged[name] = f"{merged[name]}, {value}"
        else:
            merged[name] = value
    metadata = {"statusCode": status, "headers": merged, "cookies": cookies}
    return json.dumps(metadata, separators=(",", ":")).encode() + DELIMITER
