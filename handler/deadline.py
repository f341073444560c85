"""Deadlines: the moment (time.monotonic) by which an answer must be complete.

On Lambda it is the invocation's remaining time minus DEADLINE_MARGIN_MS, kept for sending the
answer; in server mode there is none (None). Every layer computes and tests it through here.
"""

from __future__ import annotations

import time
from typing import Any

Deadline = float | None


def from_remaining_ms(remaining_ms: int | None, margin_ms: int) -> Deadline:
    """A deadline `remaining_ms` from now, leaving `margin_ms` to respond; None without one."""
    if remaining_ms is None:
        return None
    return time.monotonic() + max(0, remaining_ms - margin_ms) / 1000.0


def from_context(context: Any, margin_ms: int) -> Deadline:
    """The deadline of a Lambda context (anything with `get_remaining_time_in_millis`)."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    return from_remaining_ms(remaining() if remaining else None, margin_ms)


def passed(deadline: Deadline) -> bool:
    """Whether the deadline is set and has passed."""
    return deadline is not None and time.monotonic() >= deadline


def seconds_left(deadline: Deadline, floor_s: float = 0.0) -> float | None:
    """Seconds until the deadline, at least `floor_s`; None without a deadline."""
    if deadline is None:
        return None
    return max(floor_s, deadline - time.monotonic())
