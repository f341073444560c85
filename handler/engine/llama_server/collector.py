"""One thread that reads every buffered answer streamed from llama-server's child.

A buffered request a client can hang up on is streamed from the child (`LlamaServerEngine._send`
says why). Read by its own pool thread, each of its tokens woke that thread: on this machine the
buffered request then cost our process 2.8x the CPU per token of one non-streamed answer
(bench/RESULTS.md). Here one thread waits on all their sockets at once, so a decode step that
hands every busy slot a token wakes one thread, not one per request; the request's own thread
sleeps until the answer is in. The same pass stops a cancelled or late request: it closes the
connection, and llama-server drops the task at its next token.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from handler import deadline as deadlines
from handler.engine.generation import Generation, Piece, TokenLogprob
from handler.engine.llama_server.process import ServerError, event_of, server_error
from handler.engine.llama_server.reading import StreamReading
from handler.engine.llama_server.upstream import READ_BYTES, AnswerFeed, Connection
from handler.errors import APIError

# How often a pass checks every answer's cancel and deadline when no bytes arrive.
POLL_S = 0.1
# How long the thread waits for the next answer once it has none (a new thread per request
# would cost a start each).
IDLE_S = 5.0


@dataclass(eq=False)
class Collecting:
    """One answer being read: its connection, its reading, what it has given so far."""

    conn: Connection
    sock: socket.socket
    reading: StreamReading
    out: Generation
    deadline: deadlines.Deadline
    feed: AnswerFeed = field(default_factory=AnswerFeed)
    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    error_body: list[bytes] = field(default_factory=list)
    error: BaseException | None = None
    over: bool = False  # the answer ended, or was stopped: the collector closes it next
    done: threading.Event = field(default_factory=threading.Event)  # closed, all handed on

    def add(self, piece: Piece | None) -> None:
        if piece is not None:
            self.texts.append(piece.text)
            self.logprobs.extend(piece.logprobs)

    def piece(self) -> Piece | None:
        """Everything the answer gave, as one piece."""
        if not self.texts:
            return None
        return Piece("".join(self.texts), tuple(self.logprobs))


class Collector:
    """Reads streamed answers to the end on one thread (started when needed, gone once idle
    for `idle_s`)."""

    def __init__(self, idle_s: float = IDLE_S) -> None:
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._added: list[Collecting] = []
        self._wake: socket.socket | None = None  # the running thread's wake-up socket

    def read(
        self,
        conn: Connection,
        reading: StreamReading,
        out: Generation,
        deadline: deadlines.Deadline,
    ) -> Piece | None:
        """Block until the answer on `conn` (its request sent) has ended, `out` was cancelled
        or its deadline passed; everything it gave, as one piece. Closes `conn`."""
        sock = conn.sock
        if sock is None:
            raise ServerError("llama-server /completion: the connection is closed")
        entry = Collecting(conn, sock, reading, out, deadline)
        with self._lock:
            self._added.append(entry)
            wake = self._wake
            if wake is None:
                ours, wake = socket.socketpair()
                wake.setblocking(False)
                self._wake = wake
                threading.Thread(
                    target=self._run, args=(ours,), name="coldstart-collector", daemon=True
                ).start()
            with contextlib.suppress(OSError):  # full: a wake-up is already pending
                wake.send(b"\0")
        entry.done.wait()
        if entry.error is not None:
            raise entry.error
        return entry.piece()

    def _run(self, wakeup: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        wakeup.setblocking(False)
        selector.register(wakeup, selectors.EVENT_READ)
        watched: set[Collecting] = set()
        added: list[Collecting] | None = []
        idle_since = swept = time.monotonic()
        try:
            while (added := self._take_added(bool(watched), idle_since)) is not None:
                now = time.monotonic()
                if added or watched:
                    idle_since = now
                for entry in added:
                    entry.sock.setblocking(False)
                    selector.register(entry.sock, selectors.EVENT_READ, entry)
                    watched.add(entry)
                ended = []
                for key, _ in selector.select(POLL_S):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            wakeup.recv(4096)
                    else:
                        self._read(key.data)
                        if key.data.over:
                            ended.append(key.data)
                if now - swept >= POLL_S:  # cancels and deadlines, a few times a second
                    swept = now
                    ended += [
                        entry
                        for entry in watched
                        if not entry.over and entry.out.should_stop(entry.deadline)
                    ]
                for entry in ended:
                    entry.over = True
                    watched.discard(entry)
                    self._end(selector, entry)
        except BaseException as exc:  # a bug here must not leave a reader waiting for ever
            with self._lock:
                waiting = {*watched, *(added or ()), *self._added}
                self._added, self._wake = [], None
            for entry in waiting:
                entry.error = entry.error or ServerError(f"the collector failed: {exc!r}")
                self._end(selector, entry)
            raise
        finally:
            selector.close()
            wakeup.close()

    def _take_added(self, busy: bool, idle_since: float) -> list[Collecting] | None:
        """The answers added since the last pass; None when the thread is to end (nothing to
        read for `idle_s`), after which the next `read` starts another."""
        with self._lock:
            added, self._added = self._added, []
            if added or busy or time.monotonic() - idle_since < self.idle_s:
                return added
            assert self._wake is not None
            self._wake.close()
            self._wake = None
            return None

    @staticmethod
    def _read(entry: Collecting) -> None:
        """What arrived on `entry`'s socket, parsed; `over` at the answer's end or an error."""
        if entry.over:
            return
        try:
            data = entry.sock.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            entry.error = ServerError(f"llama-server /completion: {exc}")
            entry.over = True
            return
        try:
            lines = entry.feed.feed(data) if data else entry.feed.end()
            if entry.feed.status not in (None, 200):
                entry.error_body += lines
                if entry.feed.complete:
                    assert entry.feed.status is not None
                    entry.error = server_error(entry.feed.status, b"\n".join(entry.error_body))
                    entry.over = True
                return
            for line in lines:
                if (chunk := event_of(line)) is None:
                    continue
                entry.add(entry.reading.add(chunk))
                if entry.reading.done:
                    entry.over = True
                    return
            entry.over = entry.feed.complete  # an answer that ended without its last chunk
        except (ServerError, APIError) as exc:  # an error event, as `server_error` made it
            entry.error = exc
            entry.over = True
        except (ValueError, ConnectionError) as exc:
            entry.error = ServerError(f"llama-server /completion: {exc}")
            entry.over = True

    @staticmethod
    def _end(selector: selectors.BaseSelector, entry: Collecting) -> None:
        """Stop watching `entry`, close its connection (mid-answer, llama-server drops the
        task), hand on the held-back tail and wake its reader; once."""
        if entry.done.is_set():
            return
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(entry.sock)
        entry.conn.close()
        if entry.error is None:
            entry.add(entry.reading.end())
        entry.done.set()
