"""What resolving a model gives every caller: the verified file, the one-line failure, progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Progress = Callable[[int, int], None]
"""`progress(bytes_done, bytes_total)`, called as a download advances."""


class ModelSourceError(RuntimeError):
    """The model cannot be used; the message is one line naming the path or URI."""


@dataclass(frozen=True)
class ResolvedModel:
    """A local model file that passed verification."""

    path: Path
    size_bytes: int
    source: str  # "local" or "s3"
    sha256: str | None = None
