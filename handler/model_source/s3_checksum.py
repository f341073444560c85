"""What a downloaded S3 model must hash to, hashing it while it downloads, and the comparison.

The expected sha256 comes from MODEL_SHA256, else the object's own ChecksumSHA256: over the bytes
for a single-part upload, over the parts' checksums (composite) for a multipart one.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from handler.model_source.resolved import ModelSourceError
from handler.model_source.s3_object import ObjectInfo, S3Location

if TYPE_CHECKING:  # annotations only
    from handler.config import Settings

log = logging.getLogger("coldstart.s3")


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


def expected_checksum(
    settings: Settings, client: Any, location: S3Location, info: ObjectInfo
) -> Expected:
    """The checksum to verify against: pinned, full-object, composite, or none (size only)."""
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


def verify(uri: str, expected: Expected, digest: Digest) -> None:
    """Raise a one-line ModelSourceError naming who said otherwise if the hashes differ."""
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
                while self._frontier <= hashed and not self._stopped:
                    self._changed.wait()
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
