"""The MODEL_CACHE_DIR copy of an S3 model: its file names, the verified marker and the lock.

Files in the cache directory, per model:

    <name>          the verified model, renamed into place only after it passed every check
    <name>.verified a small JSON marker (size, ETag, sha256, inode): a file without it is never used
    <name>.part     the download in progress; removed on any failure
    <name>.lock     flock'd for the whole resolve, so processes sharing the directory download once
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler.model_source.resolved import ModelSourceError, ResolvedModel
from handler.model_source.s3_object import ObjectInfo, S3Location

log = logging.getLogger("coldstart.s3")


@dataclass(frozen=True)
class CacheFiles:
    """Where one model lives in the cache directory (see the module docstring)."""

    model: Path
    marker: Path
    part: Path
    lock: Path


def cache_files(cache_dir: Path, location: S3Location) -> CacheFiles:
    """Cache paths for `location`: readable basename, prefixed by a hash so keys never collide."""
    digest = hashlib.sha256(location.uri.encode()).hexdigest()[:12]
    basename = re.sub(r"[^A-Za-z0-9._-]", "_", location.key.rsplit("/", 1)[-1])
    model = cache_dir / f"{digest}-{basename}"
    return CacheFiles(
        model=model,
        marker=model.with_name(model.name + ".verified"),
        part=model.with_name(model.name + ".part"),
        lock=model.with_name(model.name + ".lock"),
    )


@contextmanager
def exclusive(lock_path: Path, uri: str) -> Iterator[None]:
    """Hold an exclusive flock; the kernel drops it when the holder dies, so it never goes stale."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ModelSourceError(
            f"model {uri}: cannot open lock file {lock_path} ({exc.strerror})"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("model %s: waiting for another process that is fetching it", uri)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_marker(files: CacheFiles, uri: str) -> dict[str, Any] | None:
    """The marker, if it still describes the file on disk (same inode, size and mtime)."""
    try:
        marker = json.loads(files.marker.read_text())
        stat = files.model.stat()
    except (OSError, ValueError):
        return None
    same_file = (
        isinstance(marker, dict)
        and marker.get("uri") == uri
        and marker.get("size") == stat.st_size
        and marker.get("inode") == stat.st_ino
        and marker.get("mtime_ns") == stat.st_mtime_ns
    )
    return marker if same_file else None


def write_marker(files: CacheFiles, uri: str, info: ObjectInfo, sha256: str) -> None:
    """Mark the model file in place as verified, atomically (a torn marker is never read)."""
    stat = files.model.stat()
    marker = {
        "uri": uri,
        "size": stat.st_size,
        "etag": info.etag,
        "version_id": info.version_id,
        "sha256": sha256,
        "inode": stat.st_ino,
        "mtime_ns": stat.st_mtime_ns,
    }
    tmp = files.marker.with_name(files.marker.name + ".tmp")
    tmp.write_text(json.dumps(marker))
    os.replace(tmp, files.marker)


def reuse(files: CacheFiles, marker: dict[str, Any], uri: str) -> ResolvedModel:
    """The verified cache file, as its marker describes it."""
    log.info("model %s: reusing verified cache file %s", uri, files.model)
    return ResolvedModel(
        path=files.model, size_bytes=marker["size"], source="s3", sha256=marker.get("sha256")
    )
