"""Turns MODEL_URI into a verified local GGUF file path.

Local paths, `file://` URIs and EFS mount paths are used in place: mmap reads pages on demand, so
copying would only cost time. `s3://` objects are downloaded by `handler.s3_fetch` (boto3 is
imported only then). Nothing here hands a partial or unverified file to the engine.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from handler.config import Settings

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)

Progress = Callable[[int, int], None]


class ModelSourceError(RuntimeError):
    """The model cannot be used; the message is one line naming the path or URI."""


@dataclass(frozen=True)
class ResolvedModel:
    """A local model file that passed verification."""

    path: Path
    size_bytes: int
    source: str  # "local" or "s3"
    sha256: str | None = None


def resolve_model(settings: Settings, progress: Progress | None = None) -> ResolvedModel:
    """Return a verified local file for `settings.model_uri`, downloading it first if remote.

    `progress(bytes_done, bytes_total)` is called as a download advances.
    """
    uri = settings.model_uri
    if uri.startswith("s3://"):
        from handler.s3_fetch import fetch_s3_model

        return fetch_s3_model(settings, progress)
    path = local_path(uri)
    check_gguf_file(path)
    size = path.stat().st_size
    if settings.model_size_bytes is not None and size != settings.model_size_bytes:
        raise ModelSourceError(
            f"model {path}: size {size} does not match MODEL_SIZE_BYTES {settings.model_size_bytes}"
        )
    digest = None
    if settings.model_verify_hash and settings.model_sha256:
        digest = sha256_file(path)
        if digest != settings.model_sha256:
            raise ModelSourceError(
                f"model {path}: sha256 {digest} does not match MODEL_SHA256 {settings.model_sha256}"
            )
    return ResolvedModel(path=path, size_bytes=size, source="local", sha256=digest)


def local_path(uri: str) -> Path:
    """A plain path or `file://` URI as a Path; other schemes are a configuration error."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise ModelSourceError(
            f"model {uri}: unsupported scheme {parsed.scheme!r} (use a path or s3://)"
        )
    return Path(uri)


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


def sha256_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in large chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
