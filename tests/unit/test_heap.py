"""GIVEN the process's objects once the stack is imported WHEN the heap is frozen after the load
THEN the collector's full passes skip them, and what the load built is frozen too."""

from __future__ import annotations

import gc
import threading

from handler.heap import freeze_after_load, freeze_now


class Loading:
    """An engine whose load ends when the test says so (the Loads protocol)."""

    def __init__(self) -> None:
        self.loaded = threading.Event()

    def wait_loaded(self, timeout_s: float | None) -> object:
        self.loaded.wait(timeout_s)
        return "ready"


def test_freeze_now_moves_live_objects_out_of_the_collector():
    try:
        kept = [{"n": i} for i in range(1000)]
        assert freeze_now() >= len(kept)
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()


def test_what_the_load_builds_is_frozen_once_it_is_loaded():
    engine = Loading()
    try:
        thread = freeze_after_load(engine)
        before = gc.get_freeze_count()
        assert before > 0
        built = [[i] for i in range(5000)]  # what the load allocates
        tracked = {id(o) for o in gc.get_objects()}
        assert all(id(item) in tracked for item in built)  # not frozen yet
        assert thread.is_alive()  # still waiting for the load
        engine.loaded.set()
        thread.join(5)
        assert not thread.is_alive()
        # Frozen: out of every generation the collector walks. (The freeze count itself may
        # fall meanwhile: a frozen object whose last reference goes, from an earlier test's
        # threads say, is freed all the same.)
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(item) in tracked for item in built)
    finally:
        gc.unfreeze()
