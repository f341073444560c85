"""GIVEN a server on the loopback that keeps connections alive as llama-server does WHEN the
engine makes short calls to it (/tokenize, /props) THEN they share one connection; a connection
the server says it closes, or closes while we keep it, or one kept too long, is not used again,
and the call still succeeds; no more than KEEP_MAX are kept; stopping closes what is kept."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from handler.config import load_settings
from handler.engine.llama_server import process
from handler.engine.llama_server.process import LlamaServer
from tests.unit.loopback import LoopbackServer, answer_json, read_request


class KeepAlive(LoopbackServer):
    """Answers every request on a connection with `{"n": <its number>}`; with `close_after`,
    the answer that many says `Connection: close` and the connection ends; with `drop`, the
    connection ends after each answer without saying so (an idle keep-alive running out); with
    `together`, the first answers wait until that many requests are in (calls at once)."""

    def __init__(
        self, close_after: int | None = None, drop: bool = False, together: int = 1
    ) -> None:
        self.close_after, self.drop = close_after, drop
        self.together = threading.Barrier(together)
        self.requests: list[bytes] = []
        self.ended = threading.Event()  # a connection saw the client close it
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            pending = b""
            served = 0
            while True:
                request = read_request(conn, pending)
                if request is None:
                    self.ended.set()
                    return
                head, _, pending = request
                self.requests.append(head)
                if served == 0:
                    self.together.wait(5)
                served += 1
                closing = self.close_after is not None and served == self.close_after
                extra = b"Connection: close\r\n" if closing else b""
                answer_json(conn, {"n": len(self.requests)}, extra)
                if closing or self.drop:
                    return


@contextmanager
def child(**how: object) -> Iterator[tuple[LlamaServer, KeepAlive]]:
    server = KeepAlive(**how)  # type: ignore[arg-type]
    llama = LlamaServer(load_settings({"INFERENCE_ENGINE": "llama-server"}), "model.gguf")
    llama.port = server.port
    try:
        yield llama, server
    finally:
        llama.close_kept()
        server.close()


def test_short_calls_share_one_kept_connection():
    with child() as (llama, server):
        answers = [llama.call("POST", "/tokenize", {"content": "hi"})["n"] for _ in range(3)]
        assert answers == [1, 2, 3]
        assert server.connections == 1


def test_a_connection_the_child_says_it_closes_is_not_used_again():
    with child(close_after=2) as (llama, server):
        assert [llama.call("GET", "/props")["n"] for _ in range(3)] == [1, 2, 3]
        assert server.connections == 2


def test_a_kept_connection_the_child_closed_meanwhile_is_replaced_and_the_call_succeeds():
    with child(drop=True) as (llama, server):
        assert [llama.call("GET", "/props")["n"] for _ in range(3)] == [1, 2, 3]
        assert server.connections == 3  # each kept one found closed, the call sent anew


def test_a_connection_kept_too_long_is_closed_not_used(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(process, "KEEP_IDLE_S", -1.0)  # everything kept is already too old
    with child() as (llama, server):
        llama.call("GET", "/props")
        llama.call("GET", "/props")
        assert server.connections == 2
        assert server.ended.wait(5)  # the stale one was closed


def test_no_more_than_keep_max_connections_are_kept(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(process, "KEEP_MAX", 2)
    with child(together=4) as (llama, server):
        answers: list[int] = []
        calls = [
            threading.Thread(target=lambda: answers.append(llama.call("GET", "/props")["n"]))
            for _ in range(4)
        ]
        for call in calls:
            call.start()
        for call in calls:
            call.join(10)
        assert len(answers) == 4 and server.connections == 4  # all four were open at once
        assert len(llama._kept) == 2
        assert server.ended.wait(5)  # the other two were closed
        llama.call("GET", "/props")
        assert server.connections == 4  # the next call used a kept one


def test_closing_what_is_kept_closes_the_connections():
    with child() as (llama, server):
        llama.call("GET", "/props")
        assert not server.ended.is_set()
        llama.close_kept()
        assert server.ended.wait(5)
