"""GIVEN the P6 load's pieces WHEN fed known answers THEN its clients keep or renew connections
as asked and its figures (late loop wake-ups, the company of slow probes) count what happened."""

from __future__ import annotations

import json
import socket
import threading

from bench.p6_load import HTTPSender, Sample, lag_in_window, probe_company
from tests.unit.loopback import LoopbackServer, answer_json, read_request


class Completions(LoopbackServer):
    """Answers every POST with a buffered completion's usage; with `drop`, ends the connection
    after each answer without saying so (as llama-server does after a streamed one)."""

    def __init__(self, drop: bool = False) -> None:
        self.drop = drop
        self.answered = 0
        self.ended = threading.Event()
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            pending = b""
            while True:
                request = read_request(conn, pending)
                if request is None:
                    self.ended.set()
                    return
                _, body, pending = request
                assert json.loads(body)["stream"] is False
                self.answered += 1
                answer_json(conn, {"usage": {"completion_tokens": 5}})
                if self.drop:
                    return


def test_a_kept_alive_client_sends_every_request_on_one_connection():
    server = Completions()
    try:
        send = HTTPSender(server.port, {"prompt": "hi"}, stream=False, keep_alive=True)
        samples = [send() for _ in range(3)]
        assert [(s.tokens, s.error) for s in samples] == [(5, None)] * 3
        assert server.connections == 1
        send.done()
        assert server.ended.wait(5)
    finally:
        server.close()


def test_a_kept_connection_the_server_closed_is_opened_again_without_an_error():
    server = Completions(drop=True)
    try:
        send = HTTPSender(server.port, {"prompt": "hi"}, stream=False, keep_alive=True)
        samples = [send() for _ in range(3)]
        assert [(s.tokens, s.error) for s in samples] == [(5, None)] * 3
        assert server.answered == 3
        assert server.connections == 3
        send.done()
    finally:
        server.close()


def test_without_keep_alive_every_request_opens_its_own_connection():
    server = Completions()
    try:
        send = HTTPSender(server.port, {"prompt": "hi"}, stream=False)
        assert [send().tokens for _ in range(3)] == [5, 5, 5]
        assert server.connections == 3
    finally:
        server.close()


def test_a_refused_connection_is_an_error_sample_not_an_exception():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    sample = HTTPSender(port, {"prompt": "hi"}, stream=False, keep_alive=True)()
    assert sample.error == "ConnectionRefusedError"


def test_late_wake_ups_are_counted_from_the_histogram_difference():
    before = {"0.001": 10, "0.005": 12, "0.01": 13, "0.025": 14, "+Inf": 14}
    after = {"0.001": 100, "0.005": 105, "0.01": 106, "0.025": 108, "+Inf": 110}
    assert lag_in_window(before, after) == {
        "wakeups": 96, "over_5ms": 3, "over_10ms": 3, "over_25ms": 2,
    }  # fmt: skip


def test_a_slow_probe_counts_the_requests_begun_while_it_waited():
    # Eight requests begin together at t=1.0, one alone at t=3.0.
    samples = [Sample(started=1.0 + i * 0.001, ended=2.0) for i in range(8)]
    samples.append(Sample(started=3.0, ended=4.0))
    # A probe at 0.99 waits 30 ms, through the burst; one at 2.999 waits 2 ms, beside one request.
    found = probe_company(samples, starts=[0.99, 2.999, 5.0], latencies=[0.030, 0.002, 0.001])
    assert found == {"slow": 1, "slow_company": 8, "fast": 2, "fast_company": 0.5}
