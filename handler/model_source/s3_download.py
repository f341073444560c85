"""Fetches an `s3://bucket/key` model into MODEL_CACHE_DIR: verified, atomic, shared, reused.

The one entry point to the S3 modules (and so to boto3). Under the cache lock: reuse a verified
copy, else check the size and free space, download to `<name>.part` while hashing it, verify,
rename into place and write the marker; any failure removes the partial file.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from handler.model_source.gguf import check_gguf_file
from handler.model_source.resolved import ModelSourceError, Progress, ResolvedModel
from handler.model_source.s3_cache import (
    CacheFiles,
    cache_files,
    exclusive,
    read_marker,
    reuse,
    write_marker,
)
from handler.model_source.s3_checksum import PrefixHasher, expected_checksum, verify
from handler.model_source.s3_client import head_object, make_client
from handler.model_source.s3_object import ObjectInfo, S3Location, parse_s3_uri
from handler.model_source.s3_transfer import (
    MB,
    Meter,
    PositionalWriter,
    transfer,
    transfer_error,
)

if TYPE_CHECKING:  # annotations only
    from handler.config import Settings

log = logging.getLogger("coldstart.s3")


def fetch_s3_model(settings: Settings, progress: Progress | None = None) -> ResolvedModel:
    """Return the verified local copy of `settings.model_uri`, downloading it if needed."""
    location = parse_s3_uri(settings.model_uri)
    uri = location.uri
    try:
        settings.model_cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelSourceError(
            f"model {uri}: cannot create MODEL_CACHE_DIR {settings.model_cache_dir} "
            f"({exc.strerror})"
        ) from None
    files = cache_files(settings.model_cache_dir, location)
    with exclusive(files.lock, uri):
        files.part.unlink(missing_ok=True)  # left behind by a process killed mid-download
        cached = read_marker(files, uri)
        pinned = settings.model_sha256
        if cached and pinned and cached.get("sha256") == pinned:
            # The bytes are exactly the pinned ones: no need to ask S3 anything.
            return reuse(files, cached, uri)
        client = make_client(settings)
        info = head_object(client, location)
        if settings.model_size_bytes is not None and info.size != settings.model_size_bytes:
            raise ModelSourceError(
                f"model {uri}: object size {info.size} does not match "
                f"MODEL_SIZE_BYTES {settings.model_size_bytes}"
            )
        if cached and not pinned and (cached.get("etag"), cached["size"]) == (info.etag, info.size):
            return reuse(files, cached, uri)
        return _download(client, settings, location, info, files=files, progress=progress)


def _download(
    client: Any,
    settings: Settings,
    location: S3Location,
    info: ObjectInfo,
    *,
    files: CacheFiles,
    progress: Progress | None,
) -> ResolvedModel:
    uri = location.uri
    files.marker.unlink(missing_ok=True)
    files.model.unlink(missing_ok=True)  # stale: free its space before measuring what is left
    free = shutil.disk_usage(files.model.parent).free
    if free < info.size:
        raise ModelSourceError(
            f"model {uri}: needs {info.size / MB:.1f} MB in {files.model.parent} "
            f"but only {free / MB:.1f} MB is free"
        )
    expected = expected_checksum(settings, client, location, info)
    started = time.perf_counter()
    try:
        fd = os.open(files.part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            hasher = PrefixHasher(fd, info.size, expected.part_sizes)
            transfer(
                client,
                settings,
                location,
                info,
                writer=PositionalWriter(fd, hasher),
                meter=Meter(uri, info.size, progress),
            )
            digest = hasher.result()
        finally:
            os.close(fd)
        verify(uri, expected, digest)
        try:
            check_gguf_file(files.part)
        except ModelSourceError as exc:
            raise ModelSourceError(f"model {uri}: downloaded object is unusable: {exc}") from None
        os.replace(files.part, files.model)
        write_marker(files, uri, info, digest.sha256_hex)
    except BaseException as exc:
        files.part.unlink(missing_ok=True)
        if isinstance(exc, ModelSourceError | KeyboardInterrupt | SystemExit):
            raise
        raise transfer_error(uri, files.model.parent, exc) from None
    elapsed = time.perf_counter() - started
    log.info(
        "model %s: downloaded and verified %.1f MB in %.2fs (%.1f MB/s), sha256 %s",
        uri,
        info.size / MB,
        elapsed,
        info.size / MB / elapsed if elapsed else 0.0,
        digest.sha256_hex,
    )
    return ResolvedModel(
        path=files.model, size_bytes=info.size, source="s3", sha256=digest.sha256_hex
    )
