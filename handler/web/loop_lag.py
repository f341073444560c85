"""How late the serving event loop runs what is due: the figure that tells whether a slow
/healthz under load waited on this process's loop or somewhere else (the kernel, a core).

`LoopLag.run` sleeps TICK_S at a time on the loop it watches and records how much later than
asked it woke: a loop held up for L seconds shows as a wake-up at least L - TICK_S late.
/metrics shows the delays as a Prometheus histogram (`coldstart_event_loop_lag_seconds`); one
past STALL_LOG_S is logged as a warning, since a liveness probe behind it would have waited as
long. 50 wake-ups a second cost 4 ms of CPU a second on uvloop on this repository's machine kind
(0.4% of a core; 40 ms in 10 s against 1 ms for the loop alone).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from collections.abc import Callable
from itertools import accumulate

from handler.telemetry import Histogram

log = logging.getLogger("coldstart.api")

TICK_S = 0.02
STALL_LOG_S = 0.25
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class LoopLag(Histogram):
    """The delays of one event loop's timer wake-ups, cumulative per bucket."""

    def __init__(self, on_wake: Callable[[], None] | None = None) -> None:
        self._counts = [0] * (len(BUCKETS_S) + 1)  # the last one: above every bucket
        self._sum = 0.0
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._on_wake = on_wake  # at each wake-up, on the loop: HEALTH_PORT's heartbeat

    def start(self) -> None:
        """Watch the running loop from now on (once; later calls do nothing)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        """Sleep TICK_S, note how late the wake-up came (and call `on_wake`), forever."""
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(TICK_S)
            self.note(max(0.0, time.perf_counter() - asked - TICK_S))
            if self._on_wake is not None:
                try:
                    self._on_wake()
                except Exception:  # the lag figures go on whatever the hook does
                    log.exception("loop timer hook failed")

    def note(self, delay_s: float) -> None:
        """Count one wake-up `delay_s` late."""
        with self._lock:
            self._counts[bisect.bisect_left(BUCKETS_S, delay_s)] += 1
            self._sum += delay_s
        if delay_s >= STALL_LOG_S:
            log.warning("event loop ran %.0f ms late: a probe then waited as long", delay_s * 1e3)

    def snapshot(self) -> tuple[tuple[float, ...], list[int], float]:
        """(upper bounds, cumulative count per bound and then +Inf, sum of delays)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        return BUCKETS_S, list(accumulate(counts)), total
