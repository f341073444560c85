"""A stand-in for llama-server's child on the loopback: one thread per connection it accepts."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any


class LoopbackServer:
    """Listens on 127.0.0.1 (a free port) and serves each connection with `_serve` on a thread
    of its own; `close` stops listening and waits for those threads."""

    def __init__(self, backlog: int = 16) -> None:
        self.connections = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(backlog)
        self.port = self.listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()
        for thread in self._threads:
            thread.join(5)


def read_request(conn: socket.socket, pending: bytes) -> tuple[bytes, bytes, bytes] | None:
    """The next HTTP/1.1 request on `conn`, `pending` being what was read past the last one:
    (its head, its body, what follows it), or None once the client has closed the connection."""
    data = pending
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return None
        data += more
    head, _, data = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(data) < length:
        data += conn.recv(65536)
    return head, data[:length], data[length:]


def answer_json(conn: socket.socket, payload: Any, extra_headers: bytes = b"") -> None:
    """A 200 with `payload` as its JSON body (and `extra_headers`, each ending in CRLF)."""
    body = json.dumps(payload).encode()
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d"
        b"\r\n\r\n%s" % (extra_headers, len(body), body)
    )
