"""The objects alive once the model is loaded, kept out of the garbage collector's full passes.

Python's cyclic collector walks every tracked object of the oldest generation on a full pass. The
imported stack (FastAPI, pydantic, jinja2, uvicorn, our schemas) is ~60,000 objects here: a full
pass over them took 52-59 ms on this machine's cores, and it stops every thread, the event loop's
included (a /healthz probe waits it out). `gc.freeze()` moves them to the permanent generation the
collector never walks (a full pass after it: under 0.1 ms); what requests allocate afterwards is
collected as before, and the frozen objects live as long as the process anyway. How much of the
/healthz tail under load this removes was not isolated (bench/RESULTS.md, "P6 GPU, third pass").
"""

from __future__ import annotations

import gc
import threading
from typing import Protocol


class Loads(Protocol):
    """An engine, as far as freezing after its load is concerned."""

    def wait_loaded(self, timeout_s: float | None) -> object:
        """Block until loaded or failed (or the timeout)."""
        ...


def freeze_now() -> int:
    """Move every object alive now to the permanent generation; how many are frozen in all."""
    gc.freeze()
    return gc.get_freeze_count()


def freeze_after_load(engine: Loads) -> threading.Thread:
    """Freeze now (the imported stack and the app), and again once `engine` has loaded (what
    the load built: the chat template, the engine's own state)."""
    freeze_now()

    def after_load() -> None:
        engine.wait_loaded(None)
        freeze_now()

    thread = threading.Thread(target=after_load, name="coldstart-heap-freeze", daemon=True)
    thread.start()
    return thread
