"""Downloads an `s3://bucket/key` model into MODEL_CACHE_DIR, verified, atomic and shared.

The only boto3 user. Concurrent ranged GETs go through boto3's classic transfer manager (tuned
from Settings; bench/p5_s3_fetch.py compares it with the CRT client). The sha256 is computed while
the download runs, so verification adds little time. Files in the cache directory, per model:

    <name>          the verified model, renamed into place only after it passed every check
    <name>.verified a small JSON marker (size, ETag, sha256, inode): a file without it is never used
    <name>.part     the download in progress; removed on any failure
    <name>.lock     flock'd for the whole resolve, so processes sharing the directory download once
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler.config import Settings
from handler.model_source import (
    ModelSourceError,
    Progress,
    ResolvedModel,
    check_gguf_file,
)

log = logging.getLogger("coldstart.s3")

# A stalled connection should fail over to a retry well before Lambda's timeout, not after
# botocore's 60 s default.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30
PROGRESS_LOG_INTERVAL_S = 1.0
MB = 1_000_000


@dataclass(frozen=True)
class S3Location:
    """A parsed `s3://bucket/key`."""

    bucket: str
    key: str

    @property
    def uri(self) -> str:
        """The URI as users wrote it."""
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class CacheFiles:
    """Where one model lives in the cache directory (see the module docstring)."""

    model: Path
    marker: Path
    part: Path
    lock: Path


@dataclass(frozen=True)
class ObjectInfo:
    """What HeadObject says about the model object."""

    size: int
    etag: str
    version_id: str | None
    checksum_sha256: str | None  # base64, any "-N" part-count suffix removed
    composite: bool  # checksum of part checksums (multipart upload), not of the bytes


def parse_s3_uri(uri: str) -> S3Location:
    """`s3://bucket/key` as an S3Location; anything else is a configuration error."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key or key.endswith("/"):
        raise ModelSourceError(f"model {uri}: expected s3://bucket/key")
    return S3Location(bucket, key)


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
    with _exclusive(files.lock, uri):
        files.part.unlink(missing_ok=True)  # left behind by a process killed mid-download
        cached = _read_marker(files, uri)
        pinned = settings.model_sha256
        if cached and pinned and cached.get("sha256") == pinned:
            # The bytes are exactly the pinned ones: no need to ask S3 anything.
            return _reuse(files, cached, uri)
        client = _client(settings)
        info = _head(client, location)
        if settings.model_size_bytes is not None and info.size != settings.model_size_bytes:
            raise ModelSourceError(
                f"model {uri}: object size {info.size} does not match "
                f"MODEL_SIZE_BYTES {settings.model_size_bytes}"
            )
        if cached and not pinned and (cached.get("etag"), cached["size"]) == (info.etag, info.size):
            return _reuse(files, cached, uri)
        return _download(client, settings, location, info, files=files, progress=progress)


def _reuse(files: CacheFiles, marker: dict[str, Any], uri: str) -> ResolvedModel:
    log.info("model %s: reusing verified cache file %s", uri, files.model)
    return ResolvedModel(
        path=files.model, size_bytes=marker["size"], source="s3", sha256=marker.get("sha256")
    )


@contextmanager
def _exclusive(lock_path: Path, uri: str) -> Iterator[None]:
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


def _read_marker(files: CacheFiles, uri: str) -> dict[str, Any] | None:
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


def _write_marker(files: CacheFiles, uri: str, info: ObjectInfo, sha256: str) -> None:
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


def _client(settings: Settings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"total_max_attempts": settings.s3_max_attempts, "mode": "standard"},
        # One pooled connection per concurrent part; botocore's default pool (10) would
        # make the extra transfer threads queue for a connection.
        max_pool_connections=settings.s3_concurrency,
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        # Custom endpoints (MinIO, moto, VPC endpoints by IP) rarely resolve bucket subdomains.
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url, config=config
    )


def _head(client: Any, location: S3Location) -> ObjectInfo:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        head = client.head_object(Bucket=location.bucket, Key=location.key, ChecksumMode="ENABLED")
    except ClientError as exc:
        raise _client_error(client, location, exc) from None
    except BotoCoreError as exc:
        raise ModelSourceError(f"model {location.uri}: cannot reach S3 ({exc})") from None
    checksum = head.get("ChecksumSHA256")
    etag = head.get("ETag", "")
    # S3 computes SHA-256 over the whole object only for single-part uploads; a multipart
    # upload (ETag "...-N") carries a checksum of its parts' checksums instead.
    composite = head.get("ChecksumType") == "COMPOSITE" or bool(re.search(r"-\d+\"?$", etag))
    return ObjectInfo(
        size=int(head["ContentLength"]),
        etag=etag,
        version_id=head.get("VersionId"),
        checksum_sha256=checksum.split("-")[0] if checksum else None,
        composite=composite,
    )


def _client_error(client: Any, location: S3Location, exc: Any) -> ModelSourceError:
    from botocore.exceptions import BotoCoreError, ClientError

    uri = location.uri
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = exc.response.get("Error", {}).get("Code", "")
    if status == 403 or code == "AccessDenied":
        return ModelSourceError(
            f"model {uri}: access denied (the role needs s3:GetObject on the object, "
            "and s3:ListBucket to tell a missing object apart)"
        )
    if status == 404:
        # HEAD responses have no body, so a 404 does not say whether the bucket exists.
        try:
            client.head_bucket(Bucket=location.bucket)
        except ClientError as bucket_exc:
            if bucket_exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return ModelSourceError(f"model {uri}: bucket {location.bucket!r} does not exist")
        except BotoCoreError:
            pass  # the object is missing either way; the first answer is the one to report
        return ModelSourceError(f"model {uri}: object not found in bucket {location.bucket!r}")
    return ModelSourceError(f"model {uri}: S3 error {code or status}: {exc}")


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
    expected = _expected_checksum(settings, client, location, info)
    started = time.perf_counter()
    try:
        fd = os.open(files.part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            hasher = PrefixHasher(fd, info.size, expected.part_sizes)
            _transfer(
                client,
                settings,
                location,
                info,
                writer=_PositionalWriter(fd, hasher),
                meter=_Meter(uri, info.size, progress),
            )
            digest = hasher.result()
        finally:
            os.close(fd)
        _verify(uri, expected, digest)
        try:
            check_gguf_file(files.part)
        except ModelSourceError as exc:
            raise ModelSourceError(f"model {uri}: downloaded object is unusable: {exc}") from None
        os.replace(files.part, files.model)
        _write_marker(files, uri, info, digest.sha256_hex)
    except BaseException as exc:
        files.part.unlink(missing_ok=True)
        if isinstance(exc, ModelSourceError | KeyboardInterrupt | SystemExit):
            raise
        raise _transfer_error(uri, files.model.parent, exc) from None
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


@dataclass(frozen=True)
class Expected:
    """What the downloaded bytes must hash to, and who said so."""

    source: str | None  # e.g. "MODEL_SHA256"; None when there is nothing to check against
    sha256_hex: str | None = None
    composite_b64: str | None = None
    part_sizes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Digest:
    """Hashes of the downloaded file."""

    sha256_hex: str
    composite_b64: str | None  # only when part sizes were given


def _expected_checksum(
    settings: Settings, client: Any, location: S3Location, info: ObjectInfo
) -> Expected:
    uri = location.uri
    if settings.model_sha256:
        return Expected("MODEL_SHA256", sha256_hex=settings.model_sha256)
    if info.checksum_sha256 is None:
        log.warning("model %s: no sha256 to verify against, size only; pin MODEL_SHA256", uri)
        return Expected(None)
    if not info.composite:
        digest_hex = base64.b64decode(info.checksum_sha256).hex()
        return Expected("the object's ChecksumSHA256", sha256_hex=digest_hex)
    parts = _part_sizes(client, location, info)
    if parts is None:
        log.warning(
            "model %s: composite checksum but part sizes unavailable, size only; pin MODEL_SHA256",
            uri,
        )
        return Expected(None)
    return Expected(
        "the object's composite ChecksumSHA256",
        composite_b64=info.checksum_sha256,
        part_sizes=parts,
    )


def _part_sizes(client: Any, location: S3Location, info: ObjectInfo) -> tuple[int, ...] | None:
    """Part sizes of a multipart object (a composite checksum needs its part boundaries)."""
    from botocore.exceptions import BotoCoreError, ClientError

    sizes: list[int] = []
    marker = 0
    try:
        while True:
            attrs = client.get_object_attributes(
                Bucket=location.bucket,
                Key=location.key,
                ObjectAttributes=["ObjectParts"],
                MaxParts=1000,
                PartNumberMarker=marker,
                **({"VersionId": info.version_id} if info.version_id else {}),
            )
            parts = attrs.get("ObjectParts", {})
            sizes += [int(p["Size"]) for p in parts.get("Parts", []) if "Size" in p]
            if not parts.get("IsTruncated"):
                break
            marker = int(parts["NextPartNumberMarker"])
    except (ClientError, BotoCoreError, KeyError, ValueError) as exc:
        log.info("model %s: no part sizes (%s)", location.uri, exc)
        return None
    return tuple(sizes) if sizes and sum(sizes) == info.size else None


def _verify(uri: str, expected: Expected, digest: Digest) -> None:
    if expected.sha256_hex and digest.sha256_hex != expected.sha256_hex:
        raise ModelSourceError(
            f"model {uri}: sha256 {digest.sha256_hex} does not match "
            f"{expected.source} {expected.sha256_hex}"
        )
    if expected.composite_b64 and digest.composite_b64 != expected.composite_b64:
        raise ModelSourceError(
            f"model {uri}: composite sha256 {digest.composite_b64} does not match "
            f"{expected.source} {expected.composite_b64}"
        )


def _transfer_error(uri: str, cache_dir: Path, exc: BaseException) -> ModelSourceError:
    """One line for whatever stopped the transfer (the partial file is already gone)."""
    # Network errors reach here wrapped by botocore or s3transfer; a bare OSError is local.
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ModelSourceError(f"model {uri}: no space left in {cache_dir} during download")
    if isinstance(exc, OSError):
        return ModelSourceError(f"model {uri}: file error in {cache_dir} ({exc.strerror or exc})")
    cause = exc
    # s3transfer wraps the last attempt's error; report that one.
    while cause.__cause__ is None and getattr(cause, "last_exception", None) is not None:
        cause = cause.last_exception  # type: ignore[attr-defined]
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return ModelSourceError(f"model {uri}: download failed after retries: {text}")


class _Meter:
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


class PrefixHasher:
    """Hashes a file in order while it is written out of order, one thread reading behind.

    Parts of a concurrent download land anywhere; `written` records each span and a thread
    hashes, from the page cache, the prefix that is complete. The hash is ready moments
    after the last byte instead of one more full read later.
    """

    READ_BYTES = 8 << 20

    def __init__(self, fd: int, size: int, part_sizes: tuple[int, ...] | None) -> None:
        self._fd, self._size = fd, size
        self._part_sizes = part_sizes
        self._spans: dict[int, int] = {}  # start -> end of spans past the frontier
        self._frontier = 0  # bytes [0, frontier) are all written
        self._stopped = False
        self._error: BaseException | None = None
        self._sha256 = hashlib.sha256()
        self._part_digests: list[bytes] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="coldstart-sha256", daemon=True)
        self._thread.start()

    def written(self, offset: int, length: int) -> None:
        """Record that bytes [offset, offset + length) are in the file."""
        with self._changed:
            end = offset + length
            if offset <= self._frontier:
                self._frontier = max(self._frontier, end)
            else:
                self._spans[offset] = max(self._spans.get(offset, 0), end)
            while (nxt := self._spans.pop(self._frontier, None)) is not None:
                self._frontier = max(self._frontier, nxt)
            self._changed.notify()

    def all_written(self) -> None:
        """The transfer succeeded, so every byte is there whatever the spans say."""
        with self._changed:
            self._frontier = self._size
            self._changed.notify()

    def stop(self) -> None:
        """Give up (the transfer failed); the thread exits soon after."""
        with self._changed:
            self._stopped = True
            self._changed.notify()
        self._thread.join()

    def result(self) -> Digest:
        """Wait for the hash of the whole file."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        composite = None
        if self._part_sizes is not None:
            combined = hashlib.sha256(b"".join(self._part_digests)).digest()
            composite = base64.b64encode(combined).decode()
        return Digest(self._sha256.hexdigest(), composite)

    def _run(self) -> None:
        try:
            self._hash()
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            self._error = exc

    def _hash(self) -> None:
        hashed = 0
        parts = list(self._part_sizes or ())
        part = hashlib.sha256()
        part_left = parts.pop(0) if parts else -1
        while hashed < self._size:
            with self._changed:
                self._changed.wait_for(lambda h=hashed: self._frontier > h or self._stopped)
                if self._stopped:
                    return
                upto = self._frontier
            while hashed < upto:
                data = os.pread(self._fd, min(self.READ_BYTES, upto - hashed), hashed)
                if not data:
                    raise OSError(errno.EIO, f"unexpected end of file at byte {hashed}")
                hashed += len(data)
                self._sha256.update(data)
                while self._part_sizes is not None and data:
                    piece, data = data[:part_left], data[part_left:]
                    part.update(piece)
                    part_left -= len(piece)
                    if part_left == 0:
                        self._part_digests.append(part.digest())
                        part = hashlib.sha256()
                        part_left = parts.pop(0) if parts else -1


class _PositionalWriter:
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


def _transfer(
    client: Any,
    settings: Settings,
    location: S3Location,
    info: ObjectInfo,
    *,
    writer: _PositionalWriter,
    meter: _Meter,
) -> None:
    """Concurrent ranged GETs through `writer`; returns once every byte is in the file."""
    from boto3.s3.transfer import TransferConfig, create_transfer_manager
    from s3transfer.subscribers import BaseSubscriber

    class KnownObject(BaseSubscriber):  # type: ignore[misc]
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
                writer,
                extra_args=extra_args,
                subscribers=[KnownObject()],
            )
            future.result()
    except BaseException:
        writer.hasher.stop()
        raise
    writer.hasher.all_written()
