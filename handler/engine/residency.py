"""What of the model is in memory: the lazy_mmap shim's presence in this process."""

from __future__ import annotations


def lazy_mmap_active() -> bool:
    """Whether the lazy_mmap shim (no MAP_POPULATE on model mappings) is loaded in this process."""
    try:
        with open("/proc/self/maps") as maps:
            return any("liblazy_mmap" in line for line in maps)
    except OSError:
        return False
