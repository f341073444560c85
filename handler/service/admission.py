"""Admission control: bounds the generation requests in flight, answering 429 beyond them.

MAX_CONCURRENCY requests run on the engine at once (1 for the llama.cpp engine, which runs one
generation at a time) and MAX_QUEUE more may wait; the next one gets 429 with a Retry-After
estimated from recent request durations, instead of waiting unboundedly.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from handler.errors import Overloaded

EWMA_WEIGHT = 0.2


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

    def ticket(self) -> Callable[[], None]:
        """Admit one request now (or raise 429); return its release, safe to call twice."""
        self.acquire()
        started = time.monotonic()
        released = False
        lock = threading.Lock()

        def release() -> None:
            nonlocal released
            with lock:
                if released:
                    return
                released = True
            self.release(time.monotonic() - started)

        return release

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one admission for the duration of a block."""
        release = self.ticket()
        try:
            yield
        finally:
            release()
