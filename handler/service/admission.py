"""Admission control: bounds the generation requests in flight, answering 429 beyond them.

MAX_CONCURRENCY requests run on the engine at once (1 for the llama.cpp engine, which runs one
generation at a time) and MAX_QUEUE more may wait; the next one gets 429 with a Retry-After
estimated from recent request durations, instead of waiting unboundedly.

A request holds a `Ticket` from admission to its end. The HTTP front doors take it on the event
loop as the request arrives (`handler.web.dispatch`), before any thread is spent on it, and run
the handler inside `admitted(ticket)`; the service then `claim()`s that ticket instead of taking
a second one. Direct invokes and the Runtime API loop call the service without a front door:
there `claim()` admits the request itself.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from handler.errors import Overloaded

EWMA_WEIGHT = 0.2


class Ticket:
    """One admitted request's place; `release()` frees it once, from any thread."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self._started = time.monotonic()
        self._released = False
        self._lock = threading.Lock()

    @property
    def released(self) -> bool:
        """Whether the place was given back."""
        return self._released

    def release(self) -> None:
        """Give the place back (later calls do nothing); the duration feeds Retry-After."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self.admission.release(time.monotonic() - self._started)


# The ticket a front door admitted the request being handled on this thread with.
_ADMITTED: ContextVar[Ticket | None] = ContextVar("coldstart_admitted", default=None)


class Admission:
    """A counter of requests in flight with a hard capacity."""

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max_concurrency
        self.capacity = max_concurrency + max_queue
        self._in_flight = 0
        self._mean_s = 1.0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished."""
        return self._in_flight

    def acquire(self) -> None:
        """Admit one request or raise 429 with Retry-After."""
        with self._lock:
            if self._in_flight >= self.capacity:
                waves = self._in_flight / self.max_concurrency
                retry = max(1, math.ceil(waves * self._mean_s))
                raise Overloaded(
                    f"server busy: {self._in_flight} requests in flight (capacity "
                    f"{self.capacity}); retry after {retry}s",
                    retry_after_s=retry,
                )
            self._in_flight += 1

    def release(self, duration_s: float | None = None) -> None:
        """Finish one request; its duration feeds the Retry-After estimate."""
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            if duration_s is not None:
                self._mean_s += EWMA_WEIGHT * (duration_s - self._mean_s)

    def ticket(self) -> Ticket:
        """Admit one request now (or raise 429)."""
        self.acquire()
        return Ticket(self)

    def claim(self) -> Ticket:
        """The ticket of the request being handled: the one its front door admitted it with
        (inside `admitted`), else a new one (or 429)."""
        held = _ADMITTED.get()
        if held is not None and held.admission is self:
            return held
        return self.ticket()

    @contextmanager
    def admitted(self, ticket: Ticket) -> Iterator[None]:
        """Handle an already admitted request in this block: `claim()` returns `ticket`."""
        token = _ADMITTED.set(ticket)
        try:
            yield
        finally:
            _ADMITTED.reset(token)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold the request's ticket (`claim()`) for the duration of a block."""
        ticket = self.claim()
        try:
            yield
        finally:
            ticket.release()
