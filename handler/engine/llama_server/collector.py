"""One thread that reads every answer streamed from llama-server's child: the streams, and the
buffered answers read as streams.

Read by its own thread, each answer's tokens woke that thread: a decode step that hands every
busy slot a token woke one thread per request, and they all contended for the GIL with the event
loop that answers /healthz. Here one thread waits on all their sockets at once, so the step wakes
one thread. A buffered answer (`read`) is handed on as one piece to its request's thread, which
sleeps until then; a stream's pieces (`stream`) go to its `PushedGeneration` as they come, whose
reader is called back (the dispatcher runs the stream's chunks from there) or blocks on it. The
same pass stops a cancelled or late request: it closes the connection, and llama-server drops
the task at its next token.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

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


class Sink(Protocol):
    """Where an answer's pieces go, on the collector's thread."""

    def push(self, piece: Piece) -> None:
        """One piece of the answer."""

    def finish(self, error: BaseException | None = None) -> None:
        """The answer is over (its error, if it failed); called once."""


class Gathered:
    """A buffered answer's sink: every piece kept, the reader woken at the end."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def push(self, piece: Piece) -> None:
        self.texts.append(piece.text)
        self.logprobs.extend(piece.logprobs)

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done.set()

    def piece(self) -> Piece | None:
        """Everything the answer gave, as one piece."""
        if not self.texts:
            return None
        return Piece("".join(self.texts), tuple(self.logprobs))


class PushedTo(Sink, Protocol):
    """A stream's sink: its generation, which also says when to stop."""

    def should_stop(self, deadline: deadlines.Deadline) -> bool:
        """Whether to stop now (cancelled, or past the deadline)."""


@dataclass(eq=False)
class Collecting:
    """One answer being read: its connection, its reading, its generation (None once dropped:
    a stream's is held weakly, so a generation nobody holds is stopped) and where its pieces
    go (None then too)."""

    conn: Connection
    sock: socket.socket
    reading: StreamReading
    out: Callable[[], Generation | PushedTo | None]
    deadline: deadlines.Deadline
    sink: Callable[[], Sink | None]
    release: Callable[[], None]  # once the connection is closed: the request is over
    feed: AnswerFeed = field(default_factory=AnswerFeed)
    error_body: list[bytes] = field(default_factory=list)
    error: BaseException | None = None
    over: bool = False  # the answer ended, or was stopped: the collector closes it next
    ended: bool = False  # closed, and the sink told


class Collector:
    """Reads streamed answers to the end on one thread (started when needed, gone once idle
    for `idle_s`)."""

    def __init__(self, idle_s: float = IDLE_S) -> None:
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._added: list[Collecting] = []
        self._sweep = False  # a cancel asked for a pass over every answer now
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
        gathered = Gathered()
        self._add(
            Collecting(
                conn, _socket_of(conn), reading, lambda: out, deadline, lambda: gathered, _nothing
            )
        )
        gathered.done.wait()
        if gathered.error is not None:
            raise gathered.error
        return gathered.piece()

    def stream(
        self,
        conn: Connection,
        reading: StreamReading,
        out: PushedTo,
        deadline: deadlines.Deadline,
        release: Callable[[], None],
    ) -> None:
        """Read the answer on `conn` (its request sent) from now on: each piece to `out` as it
        comes, then its end, when the answer ends, `out` is cancelled or dropped (held weakly
        here) or its deadline passes. Closes `conn`, then calls `release`."""
        held = weakref.ref(out)
        self._add(Collecting(conn, _socket_of(conn), reading, held, deadline, held, release))

    def sweep_soon(self) -> None:
        """Check every answer's cancel and deadline at the next pass (one was cancelled or
        dropped). Takes no lock: a generation's finalizer calls it, on any thread. (A flag
        set while a pass takes it may wait for the next timed sweep, POLL_S later.)"""
        self._sweep = True
        wake = self._wake
        if wake is not None:
            with contextlib.suppress(OSError):  # full: a wake-up is already pending; or closed
                wake.send(b"\0")

    def _add(self, entry: Collecting) -> None:
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

    def _run(self, wakeup: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        wakeup.setblocking(False)
        selector.register(wakeup, selectors.EVENT_READ)
        watched: set[Collecting] = set()
        added: list[Collecting] = []
        idle_since = swept = time.monotonic()
        try:
            while (taken := self._take_added(bool(watched), idle_since)) is not None:
                added, sweep = taken
                now = time.monotonic()
                if added or watched:
                    idle_since = now
                for entry in added:
                    entry.sock.setblocking(False)
                    selector.register(entry.sock, selectors.EVENT_READ, entry)
                    watched.add(entry)
                ended = []
                for key, _ in selector.select(0 if sweep else POLL_S):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            wakeup.recv(4096)
                    else:
                        self._read(key.data)
                        if key.data.over:
                            ended.append(key.data)
                if sweep or now - swept >= POLL_S:  # cancels and deadlines, often enough
                    swept = now
                    ended += [entry for entry in watched if not entry.over and _should_stop(entry)]
                for entry in ended:
                    entry.over = True
                    watched.discard(entry)
                    self._end(selector, entry)
        except BaseException as exc:  # a bug here must not leave a reader waiting for ever
            with self._lock:
                waiting = {*watched, *added, *self._added}
                self._added, self._wake = [], None
            for entry in waiting:
                entry.error = entry.error or ServerError(f"the collector failed: {exc!r}")
                self._end(selector, entry)
            raise
        finally:
            selector.close()
            wakeup.close()

    def _take_added(self, busy: bool, idle_since: float) -> tuple[list[Collecting], bool] | None:
        """The answers added since the last pass, and whether a sweep was asked for; None when
        the thread is to end (nothing to read for `idle_s`), after which the next answer
        starts another."""
        with self._lock:
            added, self._added = self._added, []
            sweep, self._sweep = self._sweep, False
            if added or busy or time.monotonic() - idle_since < self.idle_s:
                return added, sweep
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
                if (piece := entry.reading.add(chunk)) and (sink := entry.sink()):
                    sink.push(piece)
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
        task), hand on the held-back tail and the end to its sink; once."""
        if entry.ended:
            return
        entry.ended = True
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(entry.sock)
        entry.conn.close()
        entry.release()
        if (sink := entry.sink()) is None:
            return
        if entry.error is None and (tail := entry.reading.end()):
            sink.push(tail)
        sink.finish(entry.error)


def _socket_of(conn: Connection) -> socket.socket:
    if conn.sock is None:
        raise ServerError("llama-server /completion: the connection is closed")
    return conn.sock


def _nothing() -> None:
    pass


def _should_stop(entry: Collecting) -> bool:
    out = entry.out()
    return out is None or out.should_stop(entry.deadline)
