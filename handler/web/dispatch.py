"""Runs a route for every ASGI front door: auth, body, deadline, then the handler, off the event
loop when it may wait on the model, with a cancel event a hung-up client sets.

A generating request is admitted on the event loop the moment it arrives (429 + Retry-After at
once past MAX_CONCURRENCY + MAX_QUEUE), before any thread is spent on it. Only then does it go to
this dispatcher's own thread pool, sized to admission's capacity, so every admitted request runs
at once, the engine sees the whole queue, and the routes that must answer at once (health,
readiness, metrics, models) run inline on the loop and never wait behind generations. A streamed
answer's lines are made on the thread that calls it back (`Driver`: the llama-server engine's
collector, as each token arrives) or, for a stream that cannot be listened to, on this pool
(`sse`), never on anyio's shared 40-thread limiter.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from handler.config import Settings
from handler.service.admission import Ticket
from handler.service.chunk_stream import ChunkStream
from handler.service.openai_service import OpenAIService
from handler.web.http import WAIT_LINE, check_api_key, parse_body, scope_deadline, sse_lines
from handler.web.routes import Call, Result, Route

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

log = logging.getLogger("coldstart.api")

# Threads beyond admission's capacity: a stream that just ended may still hold its thread for
# a moment while the next admitted request starts.
SPARE_THREADS = 4


class Dispatcher:
    """Runs routes on behalf of one app."""

    def __init__(self, service: OpenAIService, settings: Settings, watch_disconnect: bool) -> None:
        self.service = service
        self.settings = settings
        self.watch_disconnect = watch_disconnect
        # One thread per admitted request at most (its handler, then its stream's chunks).
        threads = service.admission.capacity + SPARE_THREADS
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="coldstart-request")
        self._outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = (
            weakref.WeakKeyDictionary()
        )
        self._outboxes_lock = threading.Lock()

    def authenticate(self, route: Route, authorization: str | None) -> None:
        """401 unless the route is open or the bearer token matches API_KEY."""
        if route.authenticated:
            check_api_key(self.settings, authorization)

    def call(
        self, route: Route, scope: Any, params: dict[str, str], body: bytes | None = None
    ) -> Call:
        """The route's call: its body validated (400 otherwise), the request's deadline."""
        parsed = parse_body(route.schema, body or b"") if route.schema is not None else None
        return Call(parsed, params, scope_deadline(scope, self.settings))

    async def run(self, route: Route, call: Call, receive: Receive | None) -> Result:
        """The handler's result; a generating route is admitted here (or 429), runs off the loop
        and, with `watch_disconnect`, stops when the client hangs up (`receive` reports it)."""
        if not route.generates:
            return route.handle(self.service, call)
        ticket = self.service.admission.ticket()
        watcher: asyncio.Future[None] | None = None
        if self.watch_disconnect and receive is not None:
            cancel = threading.Event()
            watcher = asyncio.ensure_future(_set_on_disconnect(receive, cancel))
            call = dataclasses.replace(call, cancel=cancel)
        # The caller's context (the invocation's request id for the logs) goes along.
        context = contextvars.copy_context()
        future = self._pool.submit(context.run, self._handle, route, call, ticket)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda done: _abandon(done, ticket))
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    def _handle(self, route: Route, call: Call, ticket: Ticket) -> Result:
        """On a pool thread: the handler of an admitted request. Its ticket is released when
        the handler is done, unless the result is a stream, which releases it when it ends."""
        try:
            with self.service.admission.admitted(ticket):
                result = route.handle(self.service, call)
        except BaseException:
            ticket.release()
            raise
        if not isinstance(result, ChunkStream):
            ticket.release()
        return result

    async def sse(self, chunks: ChunkStream) -> AsyncIterator[str]:
        """The server-sent events of a stream, handed to the loop as they come; closes the
        stream at the end, whatever ends it (the client hanging up included).

        A stream that can be listened to (the llama-server engine's) is read on whichever
        thread calls it back (`Driver`): the collector's, as each token arrives, so no thread
        waits between its tokens. Any other is read by one thread of this dispatcher's pool
        for the stream's life."""
        outbox = self._outbox(asyncio.get_running_loop())
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        context = contextvars.copy_context()
        driver = Driver(chunks, outbox, lines, context)
        listened = chunks.listen(driver.poke)
        if listened:
            self._pool.submit(driver.poke)  # its opening lines, up to its first token
        else:
            self._pool.submit(context.run, _pump, chunks, outbox, lines)
        try:
            while (line := await lines.get()) is not None:
                yield line
        finally:
            if listened:
                driver.close()
            else:
                chunks.close()

    def _outbox(self, loop: asyncio.AbstractEventLoop) -> Outbox:
        """The outbox of `loop` (one per loop: a Runtime API worker runs one of its own)."""
        with self._outboxes_lock:
            outbox = self._outboxes.get(loop)
            if outbox is None:
                outbox = self._outboxes[loop] = Outbox(loop)
            return outbox


class Outbox:
    """Lines from the pool's threads to one event loop's queues, with one wakeup of the loop for
    all the lines that arrive before it runs. llama-server hands every busy slot's token over in
    the same moment each decode step: at 64 streams that was up to 64 wakeups of the loop per
    step (a write to its self-pipe, a pass of its selector, each); now the first line since the
    loop last ran wakes it and the others ride along (tests/unit/test_dispatch.py counts them)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: the dispatcher's outboxes are keyed weakly by their loop, which a strong
        # reference from here would keep alive for ever.
        self._loop = weakref.ref(loop)
        self._lines: list[tuple[asyncio.Queue[str | None], str | None]] = []
        self._lock = threading.Lock()
        self._closed = False

    def put(self, queue: asyncio.Queue[str | None], line: str | None) -> bool:
        """Queue `line` onto `queue` on the loop's side; False once the loop is closed."""
        with self._lock:
            if self._closed:
                return False
            self._lines.append((queue, line))
            if len(self._lines) > 1:
                return True  # the first of them scheduled the drain
        try:
            loop = self._loop()
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed
            with self._lock:
                self._closed = True
                self._lines.clear()
            return False
        return True

    def _drain(self) -> None:
        """On the loop: every waiting line into its queue, in the order they came."""
        with self._lock:
            lines, self._lines = self._lines, []
        for queue, line in lines:
            queue.put_nowait(line)


class Driver:
    """Reads a listened-to stream's lines as far as they go, whenever it is called back, on the
    calling thread, onto an outbox; at most one thread at a time reads it, and a call that
    comes while it is read makes that thread read on. Closing stops it; the stream itself is
    closed by whichever thread reads it last, never under another thread's read."""

    def __init__(
        self,
        chunks: ChunkStream,
        outbox: Outbox,
        queue: asyncio.Queue[str | None],
        context: contextvars.Context,
    ) -> None:
        self._chunks = chunks
        self._lines = sse_lines(chunks)
        self._outbox = outbox
        self._queue = queue
        self._context = context
        self._lock = threading.Lock()
        self._called = False  # called back since the last read began
        self._reading = False
        self._over = False  # the lines ended, or the reader is gone

    def poke(self) -> None:
        """There may be more to read: read it now, unless another thread is at it."""
        with self._lock:
            self._called = True
            if self._reading or self._over:
                return
            self._reading = True
        while (step := self._next_step()) == "read":
            self._context.run(self._read_on)
        if step == "close":
            self._chunks.close()

    def _next_step(self) -> str:
        """After a call back or a read: "read" again, "rest" until called back, or "close"."""
        with self._lock:
            if self._over or not self._called:
                self._reading = False
                return "close" if self._over else "rest"
            self._called = False
            return "read"

    def close(self) -> None:
        """The reader is gone (or has every line): stop reading; close the stream now if no
        thread reads it, else that thread closes it once its read returns."""
        with self._lock:
            self._over = True
            reading = self._reading
        if reading:
            self._chunks.cancel()
        else:
            self._chunks.close()

    def _read_on(self) -> None:
        try:
            for line in self._lines:
                if line == WAIT_LINE:
                    return
                if not self._outbox.put(self._queue, line):
                    break  # the loop is gone: nobody reads this stream any more
        except Exception:  # sse_lines answers every error itself; this is a bug of ours
            log.exception("stream reader failed")
        with self._lock:
            self._over = True
        self._outbox.put(self._queue, None)


def _pump(chunks: ChunkStream, outbox: Outbox, lines: asyncio.Queue[str | None]) -> None:
    """On a pool thread: every SSE line of `chunks` onto `lines`, then None."""
    try:
        for line in sse_lines(chunks):
            if not outbox.put(lines, line):
                chunks.close()  # the loop is gone: nobody reads this stream any more
                return
    finally:
        outbox.put(lines, None)


def _abandon(future: Future[Result], ticket: Ticket) -> None:
    """The request was cancelled while its handler was queued or running: free its ticket, and
    stop the stream it started, which nobody will read."""
    if future.cancelled():
        ticket.release()
    elif future.exception() is None and isinstance(result := future.result(), ChunkStream):
        result.close()


async def until_disconnect(receive: Receive) -> None:
    """Return when the client has hung up (`receive` reports http.disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _set_on_disconnect(receive: Receive, cancel: threading.Event) -> None:
    await until_disconnect(receive)
    cancel.set()
