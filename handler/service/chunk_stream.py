"""The chunks of a streamed response, closable from any thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any


class ChunkStream(Iterator[dict[str, Any]]):
    """The chunks of a streamed response. `close()` (the client went away, or the response is
    done) stops the generation and frees the admission slot, from any thread, even while
    another thread is blocked waiting for the next chunk; dropping it unstarted does the same."""

    def __init__(
        self,
        chunks: Iterator[dict[str, Any]],
        release: Callable[[], None],
        cancel: Callable[[], None],
    ) -> None:
        self._chunks = chunks
        self._release = release
        self._cancel = cancel

    def __next__(self) -> dict[str, Any]:
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop generating and release the slot (idempotent)."""
        self._cancel()
        self._release()
        close = getattr(self._chunks, "close", None)
        if close is not None:
            # ValueError: it is running in another thread, which ends on its own now.
            with suppress(ValueError):
                close()

    def __del__(self) -> None:
        self.close()
