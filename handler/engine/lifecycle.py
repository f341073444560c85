"""The engine lifecycle, shared by every engine: states, transitions, waiters, phases, status.

States: cold -> loading -> ready -> warm, or failed with a reason. `ready` means the model answers;
`warm` means one evaluation has run (buffers allocated, weights touched), so the next request pays
neither. Readiness, the keep-warm ping and metrics read it through `status()`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from handler import deadline as deadlines
from handler.engine.residency import lazy_mmap_active
from handler.errors import ModelNotReady

log = logging.getLogger("coldstart.engine")


class EngineState(StrEnum):
    """Lifecycle of the model; visible to callers through readiness and the keep-warm ping."""

    COLD = "cold"
    LOADING = "loading"
    READY = "ready"
    WARM = "warm"
    FAILED = "failed"


LOADED_STATES = (EngineState.READY, EngineState.WARM)


@dataclass
class Phases:
    """Wall-clock phase durations in seconds, for metrics and the cold-start waterfall."""

    resolve_s: float | None = None
    import_s: float | None = None
    load_s: float | None = None
    warmup_s: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The phases that ran."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot of the engine's state for readiness, pings and metrics."""

    state: EngineState
    reason: str | None
    model_id: str
    model_path: str | None
    model_bytes: int | None
    phases: Phases
    queue_depth: int
    download: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "state": self.state.value,
            "reason": self.reason,
            "model": self.model_id,
            "model_bytes": self.model_bytes,
            "phases_s": self.phases.as_dict(),
            "queue_depth": self.queue_depth,
            "lazy_mmap": lazy_mmap_active(),
            **self.extra,
            **(
                {"download": {"bytes_done": self.download[0], "bytes_total": self.download[1]}}
                if self.download
                else {}
            ),
        }


class Lifecycle:
    """The state machine one engine holds; thread-safe, with waiters for the load."""

    def __init__(self) -> None:
        self.phases = Phases()
        self.download: tuple[int, int] | None = None  # (bytes done, bytes total)
        self._state = EngineState.COLD
        self._reason: str | None = None
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self.warm_lock = threading.Lock()

    @property
    def state(self) -> EngineState:
        """The current state."""
        return self._state

    @property
    def reason(self) -> str | None:
        """Why the engine failed, if it did."""
        return self._reason

    @property
    def loaded(self) -> bool:
        """Whether the model answers (ready or warm)."""
        return self._state in LOADED_STATES

    def start(self, load: Callable[[], None], name: str) -> bool:
        """Run `load` on a new thread named `name` (once); False if it was started before.

        `load` resolves and loads the model and returns (the thread's work may go on after
        calling `ready()`); an exception from it becomes the `failed` state with its first line.
        """
        with self._changed:
            if self._thread is not None:
                return False
            self._thread = threading.Thread(target=self._run, args=(load,), name=name, daemon=True)
            self._set(EngineState.LOADING, None)
        self._thread.start()
        return True

    def _run(self, load: Callable[[], None]) -> None:
        try:
            load()
        except Exception as exc:  # noqa: BLE001 - any load failure becomes the `failed` state
            self.fail(first_line(exc))

    def ready(self) -> None:
        """The model is loaded."""
        self._set(EngineState.READY, None)

    def warmed(self) -> None:
        """One evaluation ran: buffers are allocated and the weights touched."""
        with self._changed:
            if self._state is EngineState.READY:
                self._set(EngineState.WARM, None)

    def fail(self, reason: str) -> None:
        """The engine cannot serve; `reason` is one line."""
        log.error("model unavailable: %s", reason)
        self._set(EngineState.FAILED, reason)

    def wait_loaded(self, timeout_s: float | None) -> EngineState:
        """Block until the model is loaded or failed, or until `timeout_s`; return the state."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._state not in (EngineState.COLD, EngineState.LOADING), timeout_s
            )
            return self._state

    def require_loaded(self, deadline: deadlines.Deadline, start: Callable[[], None]) -> None:
        """Wait for the model until `deadline`; raise a 503 error if it is not there.

        A cold engine is started with `start`. Without a deadline (server mode) nothing waits:
        readiness tells a load balancer when to send traffic, and a request that arrives early
        gets 503 with Retry-After at once.
        """
        if self.loaded:
            return
        if self._state is EngineState.COLD:
            start()
        state = self.wait_loaded(deadlines.seconds_left(deadline) or 0.0)
        if state is EngineState.FAILED:
            raise ModelNotReady(f"model failed to load: {self._reason}", retry_after_s=60)
        if state not in LOADED_STATES:
            raise ModelNotReady("model is still loading", retry_after_s=2)

    def require_usable(self) -> None:
        """Raise 503 unless the model is loaded (for calls that must not wait)."""
        if not self.loaded:
            raise ModelNotReady(f"model not loaded ({self._state.value})", retry_after_s=2)

    def on_download_progress(self, done: int, total: int) -> None:
        """Progress callback for the model source."""
        self.download = (done, total)

    def timed(self, phase: str) -> _PhaseTimer:
        """`with lifecycle.timed("load_s"): ...` records the block's duration as that phase."""
        if phase not in vars(self.phases):
            raise KeyError(phase)
        return _PhaseTimer(self.phases, phase)

    def _set(self, state: EngineState, reason: str | None) -> None:
        with self._changed:
            self._state = state
            self._reason = reason
            self._changed.notify_all()


class _PhaseTimer:
    def __init__(self, phases: Phases, name: str) -> None:
        self._phases = phases
        self._name = name
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        setattr(self._phases, self._name, time.perf_counter() - self._started)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its class name."""
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__
