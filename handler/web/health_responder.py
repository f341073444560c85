"""The health responder: `/healthz` and `/readyz` on HEALTH_PORT, answered by a small process of
its own from what the serving loop posts on the probe board (`handler.web.probe_board`).

Why a process: in the serving process every request is Python work under one GIL. When 64
clients finish together and start 64 requests at once, that is tens of milliseconds of work
(about 1.2 ms of our CPU a request on this repository's machine kind, half of it on the
event loop: bench/RESULTS.md), and a probe that arrives then waits behind all of it, on the loop
or for the GIL, whatever its route does. Here nothing else runs: a probe costs a few syscalls.

It still tells the truth about the server. The loop posts a heartbeat every 20 ms; a heartbeat
older than HEALTH_STALE_S means the loop has been stuck that long, and liveness answers 503
(`stalled`), as the loop's own /healthz could not have answered at all. Readiness is 200 in the
states a request can be served in (ready, warm), else 503 with Retry-After. It exits when the
process that started it goes (checked every POLL_S), and on SIGTERM.

Run as `python -m handler.web.health_responder --host H --port P --board-fd N --parent PID
--stale-s S` by `handler.web.health_port`; it imports nothing beyond the standard library and
the board: its first answer comes about 55 ms after the spawn.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable

from handler.web.probe_board import Posted, ProbeBoard

POLL_S = 0.25  # how often the parent's presence is checked when no probe comes
REQUEST_TIMEOUT_S = 5.0  # a connection that has not sent its request head by then is dropped
MAX_HEAD_BYTES = 8192
ACCEPT_RETRY_S = 0.05  # after an accept that failed for want of resources
SERVABLE = ("ready", "warm")


def answer(method: str, path: str, posted: Posted | None, stale_s: float) -> bytes:
    """The whole HTTP response to one request."""
    path = path.split("?", 1)[0]
    if path not in ("/healthz", "/readyz"):
        return _response(404, {"error": {"message": f"no route {path}", "type": "not_found"}})
    if method not in ("GET", "HEAD"):
        return _response(405, {"error": {"message": "use GET", "type": "method_not_allowed"}})
    head_only = method == "HEAD"
    if posted is None:
        return _response(503, {"status": "starting"}, {"Retry-After": "1"}, head_only)
    if posted.silent_s > stale_s:
        body = {"status": "stalled", "state": posted.state, "silent_s": round(posted.silent_s, 3)}
        return _response(503, body, {"Retry-After": "1"}, head_only)
    if path == "/healthz":
        return _response(200, {"status": "ok", "state": posted.state}, head_only=head_only)
    body = {"state": posted.state, "in_flight": posted.in_flight}
    if posted.state in SERVABLE:
        return _response(200, body, head_only=head_only)
    retry = "60" if posted.state == "failed" else "1"
    return _response(503, body, {"Retry-After": retry}, head_only)


REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def _response(
    status: int,
    body: dict[str, object],
    headers: dict[str, str] | None = None,
    head_only: bool = False,
) -> bytes:
    content = json.dumps(body, separators=(",", ":")).encode()
    lines = [
        f"HTTP/1.1 {status} {REASONS[status]}",
        "Content-Type: application/json",
        f"Content-Length: {len(content)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else content)


class Responder:
    """Accepts probes on `listener` and answers each from `board`, one thread, no blocking."""

    def __init__(self, listener: socket.socket, board: ProbeBoard, stale_s: float) -> None:
        self.listener = listener
        self.board = board
        self.stale_s = stale_s
        self.selector = selectors.DefaultSelector()
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, None)
        self._pending: dict[socket.socket, tuple[float, bytes]] = {}  # (accepted at, read so far)

    def serve_while(self, alive: Callable[[], bool]) -> None:
        """Answer probes until `alive()` is false (asked every POLL_S at least)."""
        while alive():
            for key, _ in self.selector.select(POLL_S):
                if key.data is None:
                    self._accept()
                else:
                    self._read(key.fileobj)  # type: ignore[arg-type]
            self._drop_late()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, say: the listener stays readable, so
                time.sleep(ACCEPT_RETRY_S)  # wait a little rather than spin on it
                return
            conn.setblocking(False)
            self._pending[conn] = (time.monotonic(), b"")
            self.selector.register(conn, selectors.EVENT_READ, "probe")

    def _read(self, conn: socket.socket) -> None:
        started, data = self._pending[conn]
        try:
            more = conn.recv(MAX_HEAD_BYTES)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        data += more
        if b"\r\n\r\n" not in data and more and len(data) < MAX_HEAD_BYTES:
            self._pending[conn] = (started, data)
            return
        self._respond(conn, data)

    def _respond(self, conn: socket.socket, data: bytes) -> None:
        request_line = data.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            response = _response(400, {"error": {"message": "bad request", "type": "bad_request"}})
        else:
            response = answer(parts[0], parts[1], self.board.read(), self.stale_s)
        with contextlib.suppress(OSError):
            conn.settimeout(1.0)
            conn.sendall(response)
        self._close(conn)

    def _drop_late(self) -> None:
        now = time.monotonic()
        for conn, (started, _) in list(self._pending.items()):
            if now - started > REQUEST_TIMEOUT_S:
                self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        self._pending.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--board-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True, help="exit once this process is gone")
    parser.add_argument("--stale-s", type=float, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    board = ProbeBoard.attach(args.board_fd)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(128)
    responder = Responder(listener, board, args.stale_s)
    responder.serve_while(lambda: os.getppid() == args.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
