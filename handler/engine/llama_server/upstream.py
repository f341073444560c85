"""HTTP/1.1 to llama-server's child over a plain socket: one request per connection.

http.client parses every response's headers with the email package (52 us a response on this
machine's cores, two responses a request: /tokenize and /completion) and reads a chunked stream
through layers of peek and readline (15 us an event against 7 here: bench/RESULTS.md, "The
upstream client"); importing it brings email and ssl (about 40 modules) into a cold start. The
child is one known server on the loopback: it answers with a Content-Length or in chunks (its
streams), so an answer's end is known without waiting for the connection's. A generation's
connection is closed after its answer; closed mid-answer, it makes llama-server cancel the
slot's task (a request that asked for `Connection: close` was not cancelled: the server stops
watching it). Short calls may send their next request on the same connection
(`LlamaServer.call`).
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

    def request(self, method: str, path: str, body: bytes | None = None) -> None:
        """Send the request (JSON body, if any), connecting first unless connected (a kept-alive
        connection whose last answer was read whole)."""
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.sock.sendall(head.encode("ascii") + b"\r\n" + (body or b""))

    def response(self) -> Response:
        """The answer's status and headers; its body is read from the returned response."""
        feed = AnswerFeed()
        first = b""
        while feed.status is None:
            if not (data := self._recv()):
                raise BrokenAnswer("llama-server closed the connection mid-answer")
            first = feed.body(data)
        return Response(feed, first, self)

    def close(self) -> None:
        """Close the socket (mid-answer, llama-server drops the slot's task); idempotent."""
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def _recv(self) -> bytes:
        """What the socket has next; b"" at its end."""
        sock = self.sock
        if sock is None:
            raise BrokenAnswer("the connection is closed")
        return sock.recv(READ_BYTES)


class Response:
    """A status, the headers (names in lower case) and a body read once, whole or by lines,
    through the answer's `AnswerFeed` (what came with the head first)."""

    def __init__(self, feed: AnswerFeed, first: bytes, conn: Connection) -> None:
        assert feed.status is not None
        self.status = feed.status
        self.headers = feed.headers
        self._feed = feed
        self._first = first
        self._conn = conn

    @property
    def chunked(self) -> bool:
        """Whether the body comes in chunks (Transfer-Encoding: chunked)."""
        return self._feed.chunked

    def read(self) -> bytes:
        """The whole body."""
        feed = self._feed
        parts = [self._first]
        while not feed.complete:
            if not (data := self._conn._recv()):
                feed.end()  # BrokenAnswer unless the body ends with the connection
                break
            parts.append(feed.body(data))
        return b"".join(parts)

    def lines(self) -> Iterator[bytes]:
        """The body's lines as they come, without their line ends."""
        feed = self._feed
        yield from feed.split(self._first)
        while not feed.complete:
            data = self._conn._recv()
            yield from feed.feed(data) if data else feed.end()


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
    """An answer parsed as its bytes arrive, for a socket read as it comes (`Response`) or that
    no thread blocks on (`Collector`): `body` takes what came and returns the body's bytes in
    it, chunks decoded; `split` cuts those into lines, `feed` does both. `status` is set once the
    head is in, `complete` once the body has ended."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.complete = False
        self._data = bytearray()
        self._mode = ""  # "chunked", "length" or "close", once the head is in
        self._left = 0  # bytes of a Content-Length body still to come
        self._partial = b""  # the start of a body line whose end has not come yet

    @property
    def chunked(self) -> bool:
        """Whether the body comes in chunks (Transfer-Encoding: chunked)."""
        return self._mode == "chunked"

    def feed(self, data: bytes) -> list[bytes]:
        """The body's lines (without their line ends) that `data` completes."""
        return self.split(self.body(data))

    def body(self, data: bytes) -> bytes:
        """The body's bytes in `data`, once the head is in (chunks decoded)."""
        self._data += data
        if self.status is None and not self._read_head():
            return b""
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
        return bytes(body)

    def end(self) -> list[bytes]:
        """The connection has ended: the last line of a body that ends with it; BrokenAnswer
        when the answer was not complete."""
        if self._mode != "close":
            raise BrokenAnswer("llama-server closed the connection mid-answer")
        self.complete = True
        return self.split(b"")

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

    def split(self, body: bytes) -> list[bytes]:
        """The lines `body` completes (the last one too, once the body is complete)."""
        *lines, self._partial = (self._partial + body).split(b"\n")
        if self.complete and self._partial:
            lines.append(self._partial)
            self._partial = b""
        return [line.removesuffix(b"\r") for line in lines]
