"""Cheap GGUF header checks: is this file, local or just downloaded, a model llama.cpp can read."""

from __future__ import annotations

import struct
from pathlib import Path

from handler.model_source.resolved import ModelSourceError

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)


def check_gguf_file(path: Path) -> None:
    """Cheap checks that catch a missing, empty, truncated-header or non-GGUF file."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ModelSourceError(f"model {path}: file not found") from None
    except OSError as exc:
        raise ModelSourceError(f"model {path}: cannot stat ({exc.strerror})") from None
    if not path.is_file():
        raise ModelSourceError(f"model {path}: not a regular file")
    try:
        with path.open("rb") as f:
            header = f.read(24)
    except OSError as exc:
        raise ModelSourceError(f"model {path}: cannot read ({exc.strerror})") from None
    if len(header) < 24:
        raise ModelSourceError(f"model {path}: too small to be a GGUF file ({stat.st_size} bytes)")
    if header[:4] != GGUF_MAGIC:
        raise ModelSourceError(f"model {path}: not a GGUF file (magic {header[:4]!r})")
    (version,) = struct.unpack("<I", header[4:8])
    if version not in SUPPORTED_GGUF_VERSIONS:
        raise ModelSourceError(f"model {path}: unsupported GGUF version {version}")
