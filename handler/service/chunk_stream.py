"""The chunks of a streamed response, closable from any thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

# The chunk a listened-to stream gives when its generation has nothing new yet (compared by
# identity; see `ChunkStream.listen`).
WAIT: dict[str, Any] = {}

Listen = Callable[[Callable[[], None]], bool]


def _cannot_listen(notify: Callable[[], None]) -> bool:
    return False


class ChunkStream(Iterator[dict[str, Any]]):
    """The chunks of a streamed response. `close()` (the client went away, or the response is
    done) stops the generation and frees the admission slot, from any thread, even while
    another thread is blocked waiting for the next chunk; dropping it unstarted does the same.

    Read as it is, `next()` blocks until the next chunk. A reader that `listen`s instead is
    called back whenever the generation has moved on, and `next()` then gives `WAIT` where it
    would block: it reads on as far as it can, from whichever thread called it back."""

    def __init__(
        self,
        chunks: Iterator[dict[str, Any]],
        release: Callable[[], None],
        cancel: Callable[[], None],
        listen: Listen = _cannot_listen,
    ) -> None:
        self._chunks = chunks
        self._release = release
        self._cancel = cancel
        self._listen = listen

    def listen(self, notify: Callable[[], None]) -> bool:
        """Call `notify` (on the producer's thread) whenever there may be more to read, and
        give `WAIT` instead of blocking; False if this stream cannot (then `next()` blocks)."""
        return self._listen(notify)

    def __next__(self) -> dict[str, Any]:
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def cancel(self) -> None:
        """Stop generating, from any thread: the stream then ends soon, on its reader's side."""
        self._cancel()

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
