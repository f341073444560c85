"""A small Lambda Runtime API (2018-06-01) on 127.0.0.1 that records what a runtime sends.

It implements the documented protocol our loop uses, including what the real emulator does not
show: concurrent `/next` (Lambda Managed Instances), streamed responses in HTTP/1.1 chunked
encoding with their trailers, each chunk timestamped on arrival, and SnapStart's restore
lifecycle ("Implementing SnapStart hooks for container images"): `GET /runtime/restore/next`
is the snapshot point and answers only when the test calls `restore()`; `POST
/runtime/restore/error` reports a failed after-restore hook; `/invocation/next` is refused with
403 before a runtime that asked for a snapshot has been restored. Used by bench/p_stream.py and by
the runtime tests (tests/integration/test_runtime_protocol.py); it lives in bench/ because bench
never imports from tests.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFIX = "/2018-06-01/runtime"
DELIMITER = b"\0" * 8


@dataclass
class Result:
    """What the runtime posted for one invocation (or for init)."""

    kind: str  # "response", "stream" or "error"
    headers: dict[str, str]
    chunks: list[tuple[float, bytes]] = field(default_factory=list)  # (perf_counter, data)
    trailers: dict[str, str] = field(default_factory=dict)
    done_at: float = 0.0

    @property
    def body(self) -> bytes:
        """The whole body, chunks joined."""
        return b"".join(data for _, data in self.chunks)

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)

    def split_prelude(self) -> tuple[dict[str, Any], bytes]:
        """A streamed HTTP response: (prelude metadata, body after the 8 NUL bytes)."""
        head, sep, rest = self.body.partition(DELIMITER)
        assert sep, "no prelude delimiter in the streamed body"
        return json.loads(head), rest


class RuntimeAPIServer:
    """Queue events with `invoke`, then read what came back with `result`."""

    def __init__(self, deadline_s: float = 120.0) -> None:
        self.deadline_s = deadline_s
        self._cond = threading.Condition()
        self._events: list[tuple[str, bytes, float]] = []
        self._ids = itertools.count(1)
        self._closed = False
        self._release_at_waiting = 0  # hold events until this many /next are waiting
        self.waiting = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.handed_at: dict[str, float] = {}
        self.results: dict[str, Result] = {}
        self.init_error: Result | None = None
        self.restore_error: Result | None = None
        self.calls: list[tuple[float, str]] = []  # (perf_counter, "GET /restore/next"...)
        self.snapshot_requested = False
        self._restored = False
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        """host:port, the value of AWS_LAMBDA_RUNTIME_API."""
        host, port = self._httpd.server_address[:2]
        return f"{host}:{port}"

    def __enter__(self) -> RuntimeAPIServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Answer every pending and later `/next` with 500 (workers stop), then stop serving."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()

    def invoke(self, event: Any, deadline_s: float | None = None) -> str:
        """Queue an event (a JSON-able value, or raw bytes); return its request id."""
        payload = event if isinstance(event, bytes) else json.dumps(event).encode()
        request_id = f"req-{next(self._ids):04d}"
        deadline = time.time() + (self.deadline_s if deadline_s is None else deadline_s)
        with self._cond:
            self._events.append((request_id, payload, deadline))
            self._cond.notify_all()
        return request_id

    def hold_until_waiting(self, n: int) -> None:
        """Hand out no event until `n` workers wait on `/next` at once."""
        with self._cond:
            self._release_at_waiting = n

    def result(self, request_id: str, timeout_s: float = 300) -> Result:
        """Wait for the runtime's answer to `request_id`."""
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self.results, timeout_s):
                raise TimeoutError(f"no answer for {request_id} after {timeout_s}s")
            return self.results[request_id]

    def wait_init_error(self, timeout_s: float = 60) -> Result:
        """Wait for a `/runtime/init/error` call."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.init_error is not None, timeout_s):
                raise TimeoutError("no init error reported")
            assert self.init_error is not None
            return self.init_error

    def wait_snapshot(self, timeout_s: float = 120) -> None:
        """Wait until the runtime calls `/runtime/restore/next` (init and its hooks are done)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.snapshot_requested, timeout_s):
                raise TimeoutError("the runtime never asked for a snapshot")

    def restore(self) -> None:
        """Answer the waiting `/runtime/restore/next`: the environment is restored."""
        with self._cond:
            self._restored = True
            self._cond.notify_all()

    def wait_restore_error(self, timeout_s: float = 60) -> Result:
        """Wait for a `/runtime/restore/error` call."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.restore_error is not None, timeout_s):
                raise TimeoutError("no restore error reported")
            assert self.restore_error is not None
            return self.restore_error

    def _restore_next(self) -> bool:
        with self._cond:
            self.snapshot_requested = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._closed or self._restored)
            return not self._closed

    def wait_waiting(self, n: int, timeout_s: float = 60) -> None:
        """Wait until `n` workers are blocked on `/next` (the runtime is ready)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.waiting >= n, timeout_s):
                raise TimeoutError(f"{self.waiting} workers waiting, expected {n}")

    # ----------------------------------------------------------------- protocol

    def _next(self) -> tuple[str, bytes, float] | None:
        with self._cond:
            self.waiting += 1
            self._cond.notify_all()
            try:
                self._cond.wait_for(
                    lambda: (
                        self._closed or (self._events and self.waiting >= self._release_at_waiting)
                    )
                )
                if self._closed:
                    return None
                self._release_at_waiting = 0  # the barrier opens once
                request_id, payload, deadline = self._events.pop(0)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                self.handed_at[request_id] = time.perf_counter()
                return request_id, payload, deadline
            finally:
                self.waiting -= 1

    def _record(self, request_id: str | None, result: Result) -> None:
        result.done_at = time.perf_counter()
        with self._cond:
            if request_id == "restore":
                self.restore_error = result
            elif request_id is None:
                self.init_error = result
            else:
                self.in_flight -= 1
                self.results[request_id] = result
            self._cond.notify_all()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Lambda's Runtime API

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.calls.append((time.perf_counter(), f"GET {self.path.removeprefix(PREFIX)}"))
                if self.path == f"{PREFIX}/restore/next":
                    if server._restore_next():
                        self._answer(200, b"")
                    else:
                        self._answer(500, b'{"errorType":"ShuttingDown"}', close=True)
                    return
                if self.path != f"{PREFIX}/invocation/next":
                    self._answer(404, b'{"errorType":"NotFound"}')
                    return
                if server.snapshot_requested and not server._restored:
                    self._answer(403, b'{"errorType":"Runtime.NotRestored"}')
                    return
                event = server._next()
                if event is None:
                    self._answer(500, b'{"errorType":"ShuttingDown"}', close=True)
                    return
                request_id, payload, deadline = event
                self._answer(
                    200,
                    payload,
                    {
                        "Lambda-Runtime-Aws-Request-Id": request_id,
                        "Lambda-Runtime-Deadline-Ms": str(int(deadline * 1000)),
                        "Lambda-Runtime-Invoked-Function-Arn": (
                            "arn:aws:lambda:us-east-1:123456789012:function:coldstart"
                        ),
                        "Lambda-Runtime-Trace-Id": f"Root=1-00000000-{request_id}",
                    },
                )

            def do_POST(self) -> None:
                server.calls.append((time.perf_counter(), f"POST {self.path.removeprefix(PREFIX)}"))
                parts = self.path.removeprefix(PREFIX).strip("/").split("/")
                headers = {k.lower(): v for k, v in self.headers.items()}
                if parts == ["init", "error"]:
                    server._record(None, Result("error", headers, self._read_body()))
                elif parts == ["restore", "error"]:
                    server._record("restore", Result("error", headers, self._read_body()))
                elif len(parts) == 3 and parts[0] == "invocation" and parts[2] == "response":
                    if headers.get("transfer-encoding", "").lower() == "chunked":
                        chunks, trailers = self._read_chunked()
                        server._record(parts[1], Result("stream", headers, chunks, trailers))
                    else:
                        server._record(parts[1], Result("response", headers, self._read_body()))
                elif len(parts) == 3 and parts[0] == "invocation" and parts[2] == "error":
                    server._record(parts[1], Result("error", headers, self._read_body()))
                else:
                    self._answer(404, b'{"errorType":"NotFound"}')
                    return
                self._answer(202, b'{"status":"OK"}')

            def _read_body(self) -> list[tuple[float, bytes]]:
                length = int(self.headers.get("Content-Length") or 0)
                return [(time.perf_counter(), self.rfile.read(length))]

            def _read_chunked(self) -> tuple[list[tuple[float, bytes]], dict[str, str]]:
                chunks: list[tuple[float, bytes]] = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        break
                    data = self.rfile.read(size)
                    chunks.append((time.perf_counter(), data))
                    self.rfile.readline()  # CRLF after the data
                trailers: dict[str, str] = {}
                while line := self.rfile.readline().strip():
                    name, _, value = line.decode("latin-1").partition(":")
                    trailers[name.strip().lower()] = value.strip()
                return chunks, trailers

            def _answer(
                self,
                status: int,
                body: bytes,
                headers: dict[str, str] | None = None,
                close: bool = False,
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

        return Handler
