"""GIVEN the health responder WHEN probes come THEN it answers from the probe board alone: alive
while the loop posts, 503 once the loop is silent, readiness by state; bad requests are 4xx."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest

from handler.web import health_responder
from handler.web.health_responder import Responder, answer
from handler.web.probe_board import Posted, ProbeBoard


def parse(response: bytes) -> tuple[int, dict[str, str], dict[str, object] | None]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == len(body) or not body
    return int(lines[0].split(" ")[1]), headers, json.loads(body) if body else None


@pytest.mark.parametrize(
    ("method", "path", "posted", "status", "body"),
    [
        ("GET", "/healthz", Posted(0.01, "warm", 2), 200, {"status": "ok", "state": "warm"}),
        ("GET", "/healthz", Posted(0.01, "failed", 0), 200, {"status": "ok", "state": "failed"}),
        ("GET", "/readyz", Posted(0.01, "ready", 5), 200, {"state": "ready", "in_flight": 5}),
        ("GET", "/readyz?full=1", Posted(0.01, "warm", 0), 200, {"state": "warm", "in_flight": 0}),
        ("GET", "/readyz", Posted(0.01, "loading", 0), 503, {"state": "loading", "in_flight": 0}),
        ("GET", "/healthz", None, 503, {"status": "starting"}),
        ("GET", "/readyz", None, 503, {"status": "starting"}),
    ],
)
def test_answers_from_what_was_posted(method, path, posted, status, body):
    found_status, headers, found = parse(answer(method, path, posted, stale_s=2.0))
    assert (found_status, found) == (status, body)
    assert headers["Connection"] == "close"
    if status == 503:
        assert headers["Retry-After"] == "1"


def test_a_silent_loop_fails_both_probes():
    for path in ("/healthz", "/readyz"):
        status, headers, body = parse(answer("GET", path, Posted(2.5, "warm", 64), stale_s=2.0))
        assert status == 503
        assert body == {"status": "stalled", "state": "warm", "silent_s": 2.5}
        assert headers["Retry-After"] == "1"


def test_a_failed_model_is_not_retried_soon():
    status, headers, _ = parse(answer("GET", "/readyz", Posted(0.0, "failed", 0), stale_s=2.0))
    assert (status, headers["Retry-After"]) == (503, "60")


def test_other_paths_and_methods_are_refused():
    assert parse(answer("GET", "/v1/models", Posted(0.0, "warm", 0), 2.0))[0] == 404
    assert parse(answer("POST", "/healthz", Posted(0.0, "warm", 0), 2.0))[0] == 405
    status, headers, body = parse(answer("HEAD", "/healthz", Posted(0.0, "warm", 0), 2.0))
    assert (status, body) == (200, None)
    assert int(headers["Content-Length"]) > 0  # the GET's length, without its body


@pytest.fixture
def responder() -> Iterator[tuple[int, ProbeBoard]]:
    board = ProbeBoard.create()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    serving = Responder(listener, board, stale_s=2.0)
    running = threading.Event()
    running.set()
    thread = threading.Thread(target=serving.serve_while, args=(running.is_set,), daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], board
    finally:
        running.clear()
        thread.join(5)
        listener.close()
        board.close()


def exchange(port: int, *pieces: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        for piece in pieces:
            conn.sendall(piece)
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    return data


def test_probes_over_tcp_see_the_posts(responder):
    port, board = responder
    assert parse(exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 503
    board.post("warm", 1)
    status, _, body = parse(exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert (status, body) == (200, {"status": "ok", "state": "warm"})
    # A request head in pieces is read to its end first.
    status, _, body = parse(exchange(port, b"GET /readyz HT", b"TP/1.1\r\nHost: x\r\n", b"\r\n"))
    assert (status, body) == (200, {"state": "warm", "in_flight": 1})


def test_a_garbled_request_is_a_400(responder):
    port, board = responder
    board.post("warm", 0)
    assert parse(exchange(port, b"HELLO\r\n\r\n"))[0] == 400


def test_a_connection_that_never_sends_its_head_is_dropped(responder, monkeypatch):
    monkeypatch.setattr(health_responder, "REQUEST_TIMEOUT_S", 0.1)
    monkeypatch.setattr(health_responder, "POLL_S", 0.05)
    port, board = responder
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET /healthz")  # and nothing more
        assert conn.recv(4096) == b""  # closed by the responder, unanswered
    board.post("warm", 0)
    assert parse(exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200  # still serving


class ListenerOutOfDescriptors:
    """A listening socket whose accept fails as when the process has no descriptor left."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.accepts = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def accept(self) -> tuple[socket.socket, object]:
        self.accepts += 1
        raise OSError(24, "Too many open files")


def test_a_failing_accept_is_retried_after_a_pause_not_in_a_spin(monkeypatch):
    pauses: list[float] = []
    monkeypatch.setattr(health_responder.time, "sleep", pauses.append)
    listener = ListenerOutOfDescriptors()
    board = ProbeBoard.create()
    try:
        with socket.create_connection(listener.sock.getsockname(), timeout=5):
            # The pending connection keeps the listener readable, as it would stay.
            serving = Responder(listener, board, stale_s=2.0)  # type: ignore[arg-type]
            rounds = iter(range(5))
            serving.serve_while(lambda: next(rounds, None) is not None)
        assert listener.accepts == 5  # one attempt a pass...
        assert pauses == [health_responder.ACCEPT_RETRY_S] * 5  # ...each followed by a pause
    finally:
        listener.sock.close()
        board.close()
