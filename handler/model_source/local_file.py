"""A model on a local path, `file://` URI or EFS mount, used in place and verified cheaply.

No copy: mmap reads pages on demand, so copying would only cost time. The header and size are
always checked; the (slow) sha256 only when MODEL_VERIFY_HASH asks for it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from handler.environment import path_of_uri
from handler.model_source.gguf import check_gguf_file
from handler.model_source.resolved import ModelSourceError, ResolvedModel

if TYPE_CHECKING:  # annotations only
    from handler.config import Settings


def resolve_local_file(settings: Settings) -> ResolvedModel:
    """The file `settings.model_uri` names, once its header, size and pinned hash check out."""
    path = local_path(settings.model_uri)
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
    path = path_of_uri(uri)
    if path is None:
        raise ModelSourceError(
            f"model {uri}: unsupported scheme {urlparse(uri).scheme!r} (use a path or s3://)"
        )
    return path


def sha256_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in large chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
