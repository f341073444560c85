"""Moves the object's bytes: concurrent ranged GETs written in place, metered, errors as one line.

The transfer goes through boto3's classic transfer manager, tuned from Settings
(bench/p5_s3_fetch.py compares it with the CRT client).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from handler.model_source.resolved import ModelSourceError, Progress
from handler.model_source.s3_checksum import PrefixHasher
from handler.model_source.s3_object import ObjectInfo, S3Location

if TYPE_CHECKING:  # annotations only
    from handler.config import Settings

log = logging.getLogger("coldstart.s3")

PROGRESS_LOG_INTERVAL_S = 1.0
MB = 1_000_000


class Meter:
    """Counts bytes from the transfer threads; feeds `progress`, logs MB/s about once a second."""

    def __init__(self, uri: str, total: int, progress: Progress | None) -> None:
        self._uri, self._total, self._progress = uri, total, progress
        self._done = 0
        self._lock = threading.Lock()
        self._started = self._logged = time.perf_counter()

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            # Negative after a retried part: s3transfer takes back what that attempt counted.
            self._done += nbytes
            if self._progress is not None:
                self._progress(self._done, self._total)
            now = time.perf_counter()
            if now - self._logged < PROGRESS_LOG_INTERVAL_S:
                return
            self._logged = now
            log.info(
                "model %s: %.1f/%.1f MB at %.1f MB/s",
                self._uri,
                self._done / MB,
                self._total / MB,
                self._done / MB / (now - self._started),
            )


class PositionalWriter:
    """The file object s3transfer writes parts into: seek + write become a pwrite, reported."""

    def __init__(self, fd: int, hasher: PrefixHasher) -> None:
        self._fd, self.hasher = fd, hasher
        self._position = 0

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise OSError(errno.EINVAL, "only absolute seeks are supported")
        self._position = offset
        return offset

    def tell(self) -> int:
        return self._position

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, self._position)
            self.hasher.written(self._position, written)
            self._position += written
            view = view[written:]
        return len(data)


def transfer(
    client: Any,
    settings: Settings,
    location: S3Location,
    info: ObjectInfo,
    *,
    writer: PositionalWriter,
    meter: Meter,
) -> None:
    """Concurrent ranged GETs through `writer`; returns once every byte is in the file."""
    from boto3.s3.transfer import TransferConfig, create_transfer_manager
    from s3transfer.subscribers import BaseSubscriber

    class KnownObject(BaseSubscriber):
        """Hands over what HeadObject said, so the transfer does not ask again."""

        def on_queued(self, future: Any, **kwargs: Any) -> None:
            future.meta.provide_transfer_size(info.size)
            if hasattr(future.meta, "provide_object_etag"):  # pins parts to one ETag (IfMatch)
                future.meta.provide_object_etag(info.etag)

        def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
            meter(bytes_transferred)

    part_bytes = settings.s3_part_size_mb << 20
    config = TransferConfig(
        multipart_threshold=part_bytes,
        multipart_chunksize=part_bytes,
        max_concurrency=settings.s3_concurrency,
        num_download_attempts=settings.s3_max_attempts,
        preferred_transfer_client="classic",
    )
    extra_args = {"VersionId": info.version_id} if info.version_id else {}
    try:
        # Leaving this block waits for every transfer thread, so none writes after we return.
        with create_transfer_manager(client, config) as manager:
            future = manager.download(
                location.bucket,
                location.key,
                # s3transfer only seeks, tells and writes: all a positional writer needs to do.
                cast("IO[bytes]", writer),
                extra_args=extra_args,
                subscribers=[KnownObject()],
            )
            future.result()
    except BaseException:
        writer.hasher.stop()
        raise
    writer.hasher.all_written()


def transfer_error(uri: str, cache_dir: Path, exc: BaseException) -> ModelSourceError:
    """One line for whatever stopped the transfer (the partial file is already gone)."""
    # Network errors reach here wrapped by botocore or s3transfer; a bare OSError is local.
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ModelSourceError(f"model {uri}: no space left in {cache_dir} during download")
    if isinstance(exc, OSError):
        return ModelSourceError(f"model {uri}: file error in {cache_dir} ({exc.strerror or exc})")
    cause = exc
    # s3transfer wraps the last attempt's error; report that one.
    while cause.__cause__ is None:
        last = getattr(cause, "last_exception", None)
        if last is None:
            break
        cause = last
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return ModelSourceError(f"model {uri}: download failed after retries: {text}")
