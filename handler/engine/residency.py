"""What of the model is in memory, and making all of it so: shared by both engines.

`residency` reports the model file's bytes in the page cache (readiness, the keep-warm ping);
`make_resident` reads every page in before the environment is frozen (SnapStart, provisioned
concurrency), finishing the init prefetch or starting one; `lazy_mmap_active` tells whether the
shim that keeps llama.cpp's mmap from reading the whole file at load is in this process.
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Any

from handler.config import Settings
from handler.model_source.prefetch import Prefetch, resident_bytes


@functools.cache
def lazy_mmap_active() -> bool:
    """Whether the lazy_mmap shim (no MAP_POPULATE on model mappings) is loaded in this process.

    Read once: the shim comes in by LD_PRELOAD, at exec, and /readyz asks on the event loop at
    every probe."""
    try:
        with open("/proc/self/maps") as maps:
            return any("liblazy_mmap" in line for line in maps)
    except OSError:
        return False


def residency(path: Path | None) -> dict[str, Any]:
    """{"bytes", "percent"} of the model file in the page cache; empty when unknown."""
    if path is None:
        return {}
    try:
        resident, size = resident_bytes(path)
    except OSError:
        return {}
    return {"bytes": resident, "percent": round(100.0 * resident / size, 1) if size else 0.0}


def make_resident(path: Path, prefetch: Prefetch | None, settings: Settings) -> int:
    """Bring the whole file into the page cache, within what memory allows; bytes resident."""
    if prefetch is None or prefetch.path != path:
        prefetch = Prefetch(
            path, settings.prefetch_readers, reserve_bytes=reserve_bytes(settings)
        ).start()
    prefetch.wait()
    return resident_bytes(path)[0]


def reserve_bytes(settings: Settings) -> int:
    """Bytes the prefetch leaves free."""
    return settings.prefetch_reserve_mb << 20


# status() (so /readyz and /metrics, on the event loop) reports the model's page-cache residency.
# mincore over the whole file costs about 4 ms per 100 MB here, a tenth of a second for a 2.35 GB
# model: status() reports the last figure and refreshes it in the background when it is older.
RESIDENCY_REFRESH_S = 5.0


class ResidencyCache:
    """The last residency figure of one file, refreshed in the background when stale; the first
    call (nothing known yet) measures at once."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._value: dict[str, Any] = {}
        self._at = -RESIDENCY_REFRESH_S
        self._pending = False
        self._lock = threading.Lock()

    def get(self, path: Path) -> dict[str, Any]:
        """`residency(path)`, at most RESIDENCY_REFRESH_S old."""
        with self._lock:
            if self._path != path:
                self._path, self._value, self._at = path, {}, -RESIDENCY_REFRESH_S
            first = not self._value and not self._pending
            stale = time.monotonic() - self._at >= RESIDENCY_REFRESH_S
            start = stale and not self._pending and not first
            self._pending = self._pending or start or first
        if first:
            self.refresh(path)
        elif start:
            threading.Thread(
                target=self.refresh, args=(path,), name="coldstart-residency", daemon=True
            ).start()
        return self._value

    def refresh(self, path: Path) -> None:
        """Measure now (on any thread but the event loop, unless nothing is known yet)."""
        try:
            value = residency(path)
            with self._lock:
                if self._path in (None, path):
                    self._path, self._value, self._at = path, value, time.monotonic()
        finally:
            with self._lock:
                self._pending = False
