"""HTTP/1.1 to llama-server's child over a plain socket: one request per connection.

http.client parses every response's headers with the email package (52 us a response on this
machine's cores, two responses a request: /tokenize and /completion) and reads a chunked stream
through layers of peek and readline (15 us an event against 7 here: bench/RESULTS.md, "The
upstream client"); importing it brings email and ssl (about 40 modules) into a cold start. The
child is one known server on the loopback: it answers with a Content-Length or in chunks (its
streams), so an answer's end is known without waiting for the connection's. The connection is
closed after one answer; closed mid-answer, it makes llama-server cancel the slot's task (a
request that asked for `Connection: close` was not cancelled: the server stops watching it).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

READ_BYTES = 65536
MAX_HEAD_BYTES = 65536


class BrokenAnswer(ConnectionError):
    """The connection ended before the whole answer came, or the answer is not HTTP/1.x."""


class Connection:
    """One request and its answer. `sock` is None once closed (perhaps from another thread: a
    generation cancelled or dropped while nobody reads it)."""

    def __init__(self, host: str, port: int, timeout_s: float | None) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None
        self._data = bytearray()  # read from the socket, not handed out yet

    def request(self, method: str, path: str, body: bytes | None = None) -> None:
        """Connect and send the request (JSON body, if any)."""
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.sock.sendall(head.encode("ascii") + b"\r\n" + (body or b""))

    def response(self) -> Response:
        """The answer's status and headers; its body is read from the returned response."""
        while (end := self._data.find(b"\r\n\r\n")) < 0:
            if len(self._data) > MAX_HEAD_BYTES:
                raise BrokenAnswer("llama-server's answer headers are too long")
            self._fill()
        status, headers = parse_head(bytes(self._data[:end]))
        del self._data[: end + 4]
        return Response(status, headers, self)

    def close(self) -> None:
        """Close the socket (mid-answer, llama-server drops the slot's task); idempotent."""
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def _fill(self) -> None:
        """Read more from the socket; BrokenAnswer at its end."""
        sock = self.sock
        if sock is None:
            raise BrokenAnswer("the connection is closed")
        data = sock.recv(READ_BYTES)
        if not data:
            raise BrokenAnswer("llama-server closed the connection mid-answer")
        self._data += data

    def _read_to_end(self) -> bytes:
        """Everything until the server closes the connection."""
        while True:
            try:
                self._fill()
            except BrokenAnswer:
                break
        data = bytes(self._data)
        self._data.clear()
        return data

    def _take(self, size: int) -> bytes:
        """Exactly `size` bytes."""
        while len(self._data) < size:
            self._fill()
        data = bytes(self._data[:size])
        del self._data[:size]
        return data

    def _take_line(self) -> bytes:
        """One CRLF-ended line, without the CRLF."""
        while (end := self._data.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self._data[:end])
        del self._data[: end + 2]
        return line


class Response:
    """A status, the headers (names in lower case) and a body read once, whole or by lines."""

    def __init__(self, status: int, headers: dict[str, str], conn: Connection) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn

    @property
    def chunked(self) -> bool:
        """Whether the body comes in chunks (Transfer-Encoding: chunked)."""
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    def read(self) -> bytes:
        """The whole body."""
        if self.chunked:
            return b"".join(self._chunks())
        length = self.headers.get("content-length")
        if length is not None:
            return self._conn._take(int(length))
        return self._conn._read_to_end()

    def lines(self) -> Iterator[bytes]:
        """The body's lines as they come, without their line ends."""
        pending = b""
        parts = self._chunks() if self.chunked else iter((self.read(),))
        for part in parts:
            pending += part
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line.removesuffix(b"\r")
        if pending:
            yield pending

    def _chunks(self) -> Iterator[bytes]:
        conn = self._conn
        while True:
            size_line = conn._take_line()
            try:
                size = int(size_line.partition(b";")[0].strip(), 16)
            except ValueError:
                raise BrokenAnswer(f"bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                return  # trailers, if any, are not read: the connection closes after this
            chunk = conn._take(size)
            if conn._take(2) != b"\r\n":
                raise BrokenAnswer("a chunk does not end with CRLF")
            yield chunk


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """The status and headers (names in lower case) of an answer's head, without its CRLFCRLF."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest.partition(" ")[0]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise BrokenAnswer(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(code), headers


class AnswerFeed:
    """An answer parsed as its bytes arrive, for a socket no thread blocks on (`Collector`):
    `feed` takes what came and returns the body's lines completed by it; `status` is set once
    the head is in, `complete` once the body has ended."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.complete = False
        self._data = bytearray()
        self._mode = ""  # "chunked", "length" or "close", once the head is in
        self._left = 0  # bytes of a Content-Length body still to come
        self._partial = b""  # the start of a body line whose end has not come yet

    def feed(self, data: bytes) -> list[bytes]:
        """The body's lines (without their line ends) that `data` completes."""
        self._data += data
        if self.status is None and not self._read_head():
            return []
        body = bytearray()
        if self._mode == "chunked":
            while not self.complete and (end := self._data.find(b"\r\n")) >= 0:
                try:
                    size = int(bytes(self._data[:end]).partition(b";")[0].strip(), 16)
                except ValueError:
                    raise BrokenAnswer(f"bad chunk size {bytes(self._data[:40])!r}") from None
                if size == 0:
                    self.complete = True
                    break
                start, stop = end + 2, end + 2 + size
                if len(self._data) < stop + 2:
                    break  # the rest of this chunk has not come yet
                if self._data[stop : stop + 2] != b"\r\n":
                    raise BrokenAnswer("a chunk does not end with CRLF")
                body += self._data[start:stop]
                del self._data[: stop + 2]
        elif self._mode == "length":
            body += self._data[: self._left]
            self._left -= len(body)
            self.complete = self._left == 0
        else:
            body += self._data
        if self._mode != "chunked" or self.complete:
            self._data.clear()
        return self._lines(bytes(body))

    def end(self) -> list[bytes]:
        """The connection has ended: the last line of a body that ends with it; BrokenAnswer
        when the answer was not complete."""
        if self._mode != "close":
            raise BrokenAnswer("llama-server closed the connection mid-answer")
        self.complete = True
        return self._lines(b"")

    def _read_head(self) -> bool:
        end = self._data.find(b"\r\n\r\n")
        if end < 0:
            if len(self._data) > MAX_HEAD_BYTES:
                raise BrokenAnswer("llama-server's answer headers are too long")
            return False
        self.status, self.headers = parse_head(bytes(self._data[:end]))
        del self._data[: end + 4]
        length = self.headers.get("content-length")
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._mode = "chunked"
        elif length is not None:
            self._mode, self._left = "length", int(length)
            self.complete = self._left == 0
        else:
            self._mode = "close"
        return True

    def _lines(self, body: bytes) -> list[bytes]:
        *lines, self._partial = (self._partial + body).split(b"\n")
        if self.complete and self._partial:
            lines.append(self._partial)
            self._partial = b""
        return [line.removesuffix(b"\r") for line in lines]
