"""bench.p_probe_cost: probes on new and kept connections, and the answering process's CPU."""

from __future__ import annotations

import os
import socket

import pytest

from bench import p_probe_cost
from tests.unit.loopback import LoopbackServer, answer_json, read_request


class HealthServer(LoopbackServer):
    """Answers every GET with 200 (or `status`), keeping the connection; counts requests."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[bytes] = []
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        pending = b""
        with conn:
            while (request := read_request(conn, pending)) is not None:
                head, _, pending = request
                self.requests.append(head.split(b"\r\n")[0])
                if self.status == 200:
                    answer_json(conn, {"status": "ok"})
                else:
                    conn.sendall(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n")


def test_each_path_is_probed_on_new_connections_and_on_one_kept_open():
    server = HealthServer()
    try:
        found = p_probe_cost.probe_costs(os.getpid(), server.port, ("healthz", "readyz"), 20)
    finally:
        server.close()
    assert set(found) == {"healthz fresh", "healthz kept", "readyz fresh", "readyz kept"}
    # 20 probes and 2 warm-ups per path and kind; a new connection for each fresh one, one kept.
    assert server.requests.count(b"GET /healthz HTTP/1.1") == 44
    assert server.requests.count(b"GET /readyz HTTP/1.1") == 44
    assert server.connections == 2 * 22 + 1
    for figures in found.values():
        assert figures["cpu_us"] >= 0
        assert 0 < figures["ms"]["p50"] <= figures["ms"]["p99"] <= figures["ms"]["max"]


def test_a_probe_that_is_not_answered_200_fails_the_run():
    server = HealthServer(status=503)
    try:
        with pytest.raises(RuntimeError, match="/healthz answered 503"):
            p_probe_cost.probe_costs(os.getpid(), server.port, ("healthz",), 10)
    finally:
        server.close()
