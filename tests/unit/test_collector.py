"""GIVEN a server on the loopback that streams /completion chunks as llama-server does WHEN
buffered answers are read by the collector THEN one thread reads them all at once, each reader
gets its whole answer as one piece, a cancel or a deadline closes the connection (the server
sees it at its next write), errors are ours, and the thread is gone once nothing is read."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from handler.engine.generation import Generation, PushedGeneration, SamplingParams
from handler.engine.llama_server import collector as collector_module
from handler.engine.llama_server.collector import Collector
from handler.engine.llama_server.process import ServerError
from handler.engine.llama_server.reading import StreamReading
from handler.engine.llama_server.upstream import Connection
from handler.errors import ContextLengthExceeded, ModelNotReady
from tests.unit.loopback import LoopbackServer

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def event(payload: dict[str, Any]) -> bytes:
    data = b"data: " + json.dumps(payload).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


class Streamer(LoopbackServer):
    """Answers each connection with `tokens` chunks, `gap_s` apart, then the last one; notes
    how many it wrote before the client went away."""

    def __init__(self, tokens: int, gap_s: float, answer: bytes | None = None) -> None:
        self.tokens, self.gap_s, self.answer = tokens, gap_s, answer
        self.written: list[int] = []
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            if self.answer is not None:
                conn.sendall(self.answer)
                return
            written = 0
            try:
                conn.sendall(HEAD)
                for i in range(self.tokens):
                    conn.sendall(event({"content": f"t{i} ", "tokens_predicted": i + 1}))
                    written += 1
                    time.sleep(self.gap_s)
                conn.sendall(
                    event(
                        {
                            "content": "",
                            "stop": True,
                            "stop_type": "limit",
                            "tokens_predicted": self.tokens,
                        }
                    )
                )
                conn.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the client went away: what llama-server sees as a failed write
            self.written.append(written)


@contextmanager
def streaming(tokens: int, gap_s: float = 0.0, answer: bytes | None = None) -> Iterator[Streamer]:
    server = Streamer(tokens, gap_s, answer)
    try:
        yield server
    finally:
        server.close()


def start(port: int, max_tokens: int = 1000) -> tuple[Connection, StreamReading, Generation]:
    conn = Connection("127.0.0.1", port, 30)
    conn.request("POST", "/completion", b"{}")
    generation = Generation()
    return conn, StreamReading(SamplingParams(max_tokens=max_tokens), generation.result), generation


def collector_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "coldstart-collector")


def wait_for(check: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.01)


def test_one_thread_reads_every_answer_and_each_reader_gets_its_whole_answer():
    collector = Collector(idle_s=0.2)
    answers: list[Any] = []
    with streaming(tokens=20, gap_s=0.005) as server:
        readers = []
        for _ in range(6):
            conn, reading, generation = start(server.port)

            def read(conn=conn, reading=reading, generation=generation) -> None:
                answers.append((collector.read(conn, reading, generation, None), generation))

            readers.append(threading.Thread(target=read))
        for reader in readers:
            reader.start()
        wait_for(lambda: collector_threads() == 1)
        for reader in readers:
            reader.join(10)
        assert collector_threads() <= 1
    assert len(answers) == 6
    for piece, generation in answers:
        assert piece.text == "".join(f"t{i} " for i in range(20))
        assert generation.result.completion_tokens == 20
        assert generation.result.finish_reason == "length" and not generation.result.interrupted
    wait_for(lambda: collector_threads() == 0)  # gone once idle for idle_s


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_cancel_or_a_deadline_closes_the_connection_and_keeps_what_came(how):
    collector = Collector()
    with streaming(tokens=10_000, gap_s=0.01) as server:
        conn, reading, generation = start(server.port)
        deadline = time.monotonic() + 0.3 if how == "deadline" else None
        if how == "cancel":
            threading.Timer(0.3, generation.cancel).start()
        piece = collector.read(conn, reading, generation, deadline)
        assert generation.result.interrupted
        assert piece is not None and piece.text.startswith("t0 t1 ")
        assert conn.sock is None
        wait_for(lambda: len(server.written) == 1)
    assert server.written[0] < 200  # it stopped writing soon after, not at its end


def test_an_error_answer_is_our_error():
    body = b'{"error": {"code": 503, "message": "Loading model"}}'
    answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with streaming(tokens=0, answer=answer) as server:
        conn, reading, generation = start(server.port)
        with pytest.raises(ModelNotReady, match="Loading model"):
            Collector().read(conn, reading, generation, None)


def test_an_answer_cut_short_is_a_server_error():
    with streaming(
        tokens=0, answer=HEAD + event({"content": "a", "tokens_predicted": 1})
    ) as server:
        conn, reading, generation = start(server.port)
        with pytest.raises(ServerError, match="mid-answer"):
            Collector().read(conn, reading, generation, None)


def test_an_error_chunk_is_a_server_error():
    answer = HEAD + event({"error": {"code": 500, "message": "decode failed"}}) + b"0\r\n\r\n"
    with streaming(tokens=0, answer=answer) as server:
        conn, reading, generation = start(server.port)
        with pytest.raises(ServerError, match="decode failed"):
            Collector().read(conn, reading, generation, None)


def test_an_error_chunk_that_is_a_context_overflow_is_that_error():
    error = {"code": 400, "message": "too long", "type": "exceed_context_size_error"}
    answer = HEAD + event({"error": error}) + b"0\r\n\r\n"
    collector = Collector(idle_s=60)
    with streaming(tokens=0, answer=answer) as server:
        conn, reading, generation = start(server.port)
        with pytest.raises(ContextLengthExceeded, match="too long"):
            collector.read(conn, reading, generation, None)
    with streaming(tokens=3) as server:  # the thread is still there, and reads the next one
        conn, reading, generation = start(server.port)
        piece = collector.read(conn, reading, generation, None)
        assert piece is not None and piece.text == "t0 t1 t2 "


def pushed(
    port: int, collector: Collector
) -> tuple[Connection, StreamReading, PushedGeneration, list[int]]:
    """A streamed request to `port` whose generation `collector` pushes into: (conn, reading,
    generation, the times it was released)."""
    conn = Connection("127.0.0.1", port, 30)
    conn.request("POST", "/completion", b"{}")
    generation = PushedGeneration(3, None, collector.sweep_soon)
    reading = StreamReading(SamplingParams(max_tokens=1000), generation.result)
    return conn, reading, generation, []


def test_a_streams_pieces_are_pushed_as_they_come_then_it_ends_and_is_released_once():
    collector = Collector(idle_s=0.2)
    with streaming(tokens=20, gap_s=0.005) as server:
        conn, reading, generation, releases = pushed(server.port, collector)
        collector.stream(conn, reading, generation, None, lambda: releases.append(1))
        texts = [piece.text for piece in generation.pieces()]  # blocks for each piece
    assert texts == [f"t{i} " for i in range(20)]  # one piece per token, not one at the end
    assert generation.result.completion_tokens == 20 and not generation.result.interrupted
    assert releases == [1] and conn.sock is None


def test_a_cancelled_stream_is_stopped_at_once_not_at_the_next_timed_sweep(monkeypatch):
    monkeypatch.setattr(collector_module, "POLL_S", 60.0)  # no timed sweep in this test
    collector = Collector()
    with streaming(tokens=10_000, gap_s=0.01) as server:
        conn, reading, generation, releases = pushed(server.port, collector)
        collector.stream(conn, reading, generation, None, lambda: releases.append(1))
        first = next(generation.pieces())
        assert first.text == "t0 "
        generation.cancel()
        rest = list(generation.pieces())  # ends: the collector closed the connection
        assert generation.result.interrupted and releases == [1]
        wait_for(lambda: len(server.written) == 1)
    assert len(rest) < 100 and server.written[0] < 200


def test_a_stream_nobody_holds_any_more_is_stopped_and_released():
    collector = Collector()
    with streaming(tokens=10_000, gap_s=0.01) as server:
        conn, reading, generation, releases = pushed(server.port, collector)
        collector.stream(conn, reading, generation, None, lambda: releases.append(1))
        del generation, reading  # the collector holds the generation weakly
        wait_for(lambda: releases == [1])
        wait_for(lambda: len(server.written) == 1)
    assert server.written[0] < 200
