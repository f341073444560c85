"""GIVEN a server on the loopback answering in the ways llama-server does (a Content-Length, chunks,
an error, a connection cut short) WHEN our upstream client reads it THEN it gets the status, the
whole body or its lines, and a clear error for anything cut short; the request it sent is what
HTTP/1.1 says."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from handler.engine.llama_server.upstream import BrokenAnswer, Connection


@contextmanager
def answering(*pieces: bytes, close: bool = True) -> Iterator[tuple[int, list[bytes]]]:
    """A one-connection server that sends `pieces` one by one (a pause between them, so they
    arrive as separate reads) once it has the request; yields its port and what it received."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    while len(body) < int(line.split(b":")[1]):
                        body += conn.recv(65536)
            received.append(head + b"\r\n\r\n" + body)
            for piece in pieces:
                conn.sendall(piece)
                time.sleep(0.01)
            if not close:
                time.sleep(1.0)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], received
    finally:
        thread.join(5)
        listener.close()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_a_json_answer_with_content_length_and_the_request_sent():
    body = b'{"tokens": [1, 2, 3]}'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    with answering(head % len(body), body[:5], body[5:]) as (port, received):
        conn = Connection("127.0.0.1", port, 5)
        conn.request("POST", "/tokenize", b'{"content": "x"}')
        response = conn.response()
        assert response.status == 200
        assert response.headers["content-type"] == "application/json"
        assert response.read() == body
        conn.close()
    request = received[0]
    assert request.startswith(b"POST /tokenize HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:%d\r\n" % port in request
    assert b"connection: close" not in request.lower()  # llama-server stops watching for a hang-up
    assert b"\r\nContent-Length: 16\r\n" in request
    assert request.endswith(b'\r\n\r\n{"content": "x"}')


def test_a_chunked_stream_gives_its_lines_across_chunk_and_read_boundaries():
    events = [b'data: {"content": "a"}', b'data: {"content": "b c"}', b'data: {"stop": true}']
    stream = b"".join(e + b"\n\n" for e in events)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    # A chunk ends mid-line, another holds two events, a size line arrives in two reads.
    cut = [stream[:10], stream[10:47], stream[47:]]
    wire = b"".join(chunk(c) for c in cut) + b"0\r\n\r\n"
    with answering(head + wire[:3], wire[3:20], wire[20:]) as (port, _):
        conn = Connection("127.0.0.1", port, 5)
        conn.request("POST", "/completion", b"{}")
        response = conn.response()
        assert response.chunked
        lines = [line for line in response.lines() if line]
        conn.close()
    assert lines == events


def test_an_error_answer_keeps_its_status_and_body():
    body = b'{"error": {"code": 400, "message": "bad", "type": "invalid_request_error"}}'
    head = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(body)
    with answering(head + body) as (port, _):
        conn = Connection("127.0.0.1", port, 5)
        conn.request("GET", "/props")
        response = conn.response()
        assert (response.status, response.read()) == (400, body)
        conn.close()


@pytest.mark.parametrize(
    "wire",
    [
        b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"half":',  # body cut short
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\ndata: {",  # chunk cut short
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # not a chunk size
        b"HTTP/1.1 200 OK\r\nContent-Le",  # headers cut short
        b"SSH-2.0-OpenSSH\r\n\r\n",  # not HTTP
    ],
)
def test_an_answer_cut_short_or_not_http_is_a_broken_answer(wire):
    with answering(wire) as (port, _):
        conn = Connection("127.0.0.1", port, 5)
        conn.request("POST", "/completion", b"{}")
        with pytest.raises(BrokenAnswer):
            b"".join(conn.response().lines())
        conn.close()


def test_a_read_times_out_at_the_connection_timeout():
    with answering(b"HTTP/1.1 200 OK\r\n", close=False) as (port, _):
        conn = Connection("127.0.0.1", port, 0.2)
        conn.request("GET", "/health")
        with pytest.raises(TimeoutError):
            conn.response()
        conn.close()
        conn.close()  # idempotent
        assert conn.sock is None


def test_a_shutdown_from_another_thread_wakes_a_blocked_read():
    """How a cancelled buffered request stops waiting (the engine's hang-up watcher)."""
    with answering(b"HTTP/1.1 200 OK\r\n", close=False) as (port, _):
        conn = Connection("127.0.0.1", port, 10)
        conn.request("POST", "/completion", b"{}")
        sock = conn.sock
        assert sock is not None
        threading.Timer(0.1, sock.shutdown, args=(socket.SHUT_RDWR,)).start()
        with pytest.raises(BrokenAnswer):  # not the TimeoutError of 10 s later
            conn.response()
        conn.close()


def test_nothing_listening_is_an_os_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(OSError):
        Connection("127.0.0.1", port, 1).request("GET", "/health")
