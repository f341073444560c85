"""What of the model is in memory, and making all of it so: shared by both engines.

`residency` reports the model file's bytes in the page cache (readiness, the keep-warm ping);
`make_resident` reads every page in before the environment is frozen (SnapStart, provisioned
concurrency), finishing the init prefetch or starting one; `lazy_mmap_active` tells whether the
shim that keeps llama.cpp's mmap from reading the whole file at load is in this process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handler.config import Settings
from handler.model_source.prefetch import Prefetch, resident_bytes


def lazy_mmap_active() -> bool:
    """Whether the lazy_mmap shim (no MAP_POPULATE on model mappings) is loaded in this process."""
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
