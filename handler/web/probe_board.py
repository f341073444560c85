"""The probe board: a few words of shared memory where the serving loop posts that it is alive,
with the engine's state, and the health responder (`handler.web.health_responder`, a process of
its own) reads them.

The loop posts at every wake-up of its lag timer (`LoopLag`, every 20 ms), so the heartbeat's age
is how long the loop has been unable to run anything. Each field is one aligned 64-bit word,
written and read whole (a memoryview of unsigned 64-bit items), so a reader never sees half a
write and needs no lock: the fields are independent, and the next post is 20 ms away. The memory
is an anonymous file (memfd) whose descriptor the responder inherits: nothing on disk.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass

# EngineState's values, in a fixed order: the board holds an index (0: nothing posted yet).
STATES = ("cold", "loading", "ready", "warm", "failed")
MAGIC = 0x636F6C6473746172  # "coldstar": a board, not some other descriptor
SIZE = mmap.PAGESIZE
_MAGIC, _HEARTBEAT_US, _STATE, _IN_FLIGHT = range(4)


@dataclass(frozen=True)
class Posted:
    """What the loop last posted."""

    silent_s: float  # since the loop last ran its timer
    state: str
    in_flight: int


class ProbeBoard:
    """The board over the shared memory behind `fd` (its own copy of the descriptor)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, SIZE)
        self._words = memoryview(self._map).cast("Q")

    @classmethod
    def create(cls) -> ProbeBoard:
        """A new, empty board (the serving process's side)."""
        fd = os.memfd_create("coldstart-probe-board", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, SIZE)
            board = cls(fd)
        except BaseException:
            os.close(fd)
            raise
        board._words[_MAGIC] = MAGIC
        return board

    @classmethod
    def attach(cls, fd: int) -> ProbeBoard:
        """The board behind an inherited descriptor (the responder's side)."""
        board = cls(fd)
        if board._words[_MAGIC] != MAGIC:
            board.close()
            raise ValueError(f"descriptor {fd} is not a probe board")
        return board

    def post(self, state: str, in_flight: int) -> None:
        """On the serving loop: alive now, in `state`, with `in_flight` requests."""
        self._words[_STATE] = STATES.index(state) + 1
        self._words[_IN_FLIGHT] = max(0, in_flight)
        self._words[_HEARTBEAT_US] = time.monotonic_ns() // 1000

    def read(self) -> Posted | None:
        """The last post; None before the first."""
        heartbeat_us = self._words[_HEARTBEAT_US]
        state = self._words[_STATE]
        if heartbeat_us == 0 or not 0 < state <= len(STATES):
            return None
        silent_s = max(0.0, time.monotonic_ns() / 1000 - heartbeat_us) / 1e6
        return Posted(silent_s, STATES[state - 1], int(self._words[_IN_FLIGHT]))

    def close(self) -> None:
        """Unmap and close this side's descriptor."""
        self._words.release()
        self._map.close()
        os.close(self.fd)
