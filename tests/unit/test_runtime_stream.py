"""GIVEN a small ASGI app and a sink that records chunks WHEN the streaming cycle runs it THEN the
prelude, chunks and error trailers follow the Lambda streaming protocol."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from handler.aws_lambda.runtime_api import ErrorReport
from handler.aws_lambda.streaming import DELIMITER, StreamingCycle, prelude


class Sink:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed_with: Any = "open"

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def close(self, error: Any = None) -> None:
        self.closed_with = error


def run(app: Any) -> tuple[Sink, StreamingCycle]:
    sink = Sink()
    cycle = StreamingCycle({"type": "http"}, b'{"q": 1}', lambda: sink)
    asyncio.run(cycle.run(app))
    return sink, cycle


def test_prelude_is_json_metadata_then_eight_nul_bytes():
    raw = prelude(
        201,
        [
            (b"Content-Type", b"text/event-stream"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
            (b"vary", b"accept"),
            (b"vary", b"origin"),
        ],
    )
    head, sep, rest = raw.partition(DELIMITER)
    assert sep == b"\0" * 8 and rest == b""
    assert json.loads(head) == {
        "statusCode": 201,
        "headers": {"content-type": "text/event-stream", "vary": "accept, origin"},
        "cookies": ["a=1", "b=2"],
    }


def test_each_body_message_becomes_one_chunk_after_the_prelude():
    async def app(scope: Any, receive: Any, send: Any) -> None:
        request = await receive()
        assert request == {"type": "http.request", "body": b'{"q": 1}', "more_body": False}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    sink, _ = run(app)
    assert sink.chunks[0].endswith(DELIMITER)
    assert sink.chunks[1:] == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert sink.closed_with is None


def test_disconnect_is_reported_only_after_the_response_is_complete():
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        listener = asyncio.ensure_future(receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await asyncio.sleep(0)
        seen.append("done" if listener.done() else "waiting")
        await send({"type": "http.response.body", "body": b""})
        seen.append((await listener)["type"])

    run(app)
    assert seen == ["waiting", "http.disconnect"]


def test_failure_after_the_first_byte_closes_with_an_error():
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise ValueError("engine fell over\nsecond line")

    sink, _ = run(app)
    assert sink.chunks[1:] == [b"partial"]
    assert sink.closed_with == ErrorReport("ValueError", "engine fell over")


def test_failure_before_the_first_byte_raises_and_sends_nothing():
    opened: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise KeyError("early")

    def open_sink() -> Sink:
        opened.append(True)
        return Sink()

    cycle = StreamingCycle({"type": "http"}, b"", open_sink)
    with pytest.raises(KeyError):
        asyncio.run(cycle.run(app))
    assert opened == []


def test_an_app_that_stops_mid_response_ends_with_an_error_trailer():
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"half", "more_body": True})

    sink, _ = run(app)
    assert sink.closed_with.error_type == "Runtime.IncompleteResponse"


def test_a_broken_sink_is_raised_not_reported_as_trailers():
    class BrokenSink(Sink):
        def write(self, data: bytes) -> None:
            if self.chunks:
                raise ConnectionError("runtime API gone")
            super().write(data)

    sink = BrokenSink()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})

    cycle = StreamingCycle({"type": "http"}, b"", lambda: sink)
    with pytest.raises(ConnectionError):
        asyncio.run(cycle.run(app))
    assert sink.closed_with == "open"


def test_error_report_is_lambdas_error_document():
    report = ErrorReport.from_exception(RuntimeError("boom"))
    assert json.loads(report.body()) == {
        "errorMessage": "boom",
        "errorType": "RuntimeError",
        "stackTrace": [],
    }
    assert ErrorReport("bad\r\nname", "x").header_type() == "badname"
