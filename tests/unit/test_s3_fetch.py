"""The S3 fetch's pure parts: URI parsing, cache naming, the cache marker, in-order hashing of
out-of-order writes (full-object and composite sha256) and the checksum comparison."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import random
import threading

import pytest

from handler.model_source import ModelSourceError
from handler.model_source.s3_cache import cache_files, read_marker, write_marker
from handler.model_source.s3_checksum import Digest, Expected, PrefixHasher, verify
from handler.model_source.s3_object import ObjectInfo, S3Location, parse_s3_uri
from handler.model_source.s3_transfer import PositionalWriter, transfer_error


@pytest.mark.parametrize(
    ("uri", "bucket", "key"),
    [
        ("s3://models/a.gguf", "models", "a.gguf"),
        ("s3://models/deep/path/a.gguf", "models", "deep/path/a.gguf"),
    ],
)
def test_parse_s3_uri(uri, bucket, key):
    assert parse_s3_uri(uri) == S3Location(bucket, key)
    assert parse_s3_uri(uri).uri == uri


@pytest.mark.parametrize(
    "uri", ["s3://", "s3://bucket", "s3://bucket/", "s3:///key", "s3://b/dir/"]
)
def test_parse_s3_uri_rejects_what_is_not_an_object(uri):
    with pytest.raises(ModelSourceError, match="expected s3://bucket/key"):
        parse_s3_uri(uri)


def test_cache_names_are_readable_and_distinct_per_uri(tmp_path):
    a = cache_files(tmp_path, S3Location("one", "models/m.gguf"))
    b = cache_files(tmp_path, S3Location("two", "models/m.gguf"))
    assert a.model != b.model
    assert a.model.name.endswith("-m.gguf")
    assert a.marker.name == a.model.name + ".verified"
    assert a.part.name == a.model.name + ".part"
    assert a.lock.name == a.model.name + ".lock"
    odd = cache_files(tmp_path, S3Location("b", "x/we ird:name.gguf"))
    assert odd.model.name.endswith("-we_ird_name.gguf")


def write_out_of_order(path, data: bytes, chunk: int, hasher: PrefixHasher) -> None:
    """Write `data` in shuffled chunks the way concurrent ranged GETs land."""
    fd = os.open(path, os.O_RDWR)
    try:
        writer = PositionalWriter(fd, hasher)
        offsets = list(range(0, len(data), chunk))
        random.Random(7).shuffle(offsets)
        for offset in offsets:
            writer.seek(offset)
            writer.write(data[offset : offset + chunk])
    finally:
        os.close(fd)


def result_within(hasher: PrefixHasher, timeout_s: float = 30):
    """hasher.result() on a thread, so a hashing thread that never finishes fails the test."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(hasher.result()), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert out, "hashing did not finish"
    return out[0]


def test_prefix_hasher_hashes_out_of_order_writes_in_order(tmp_path):
    data = os.urandom(3 * (1 << 20) + 12345)
    path = tmp_path / "f.part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        hasher = PrefixHasher(fd, len(data), None)
        write_out_of_order(path, data, 256 * 1024, hasher)
        # No all_written(): the recorded spans alone must let the hash reach the end.
        digest = result_within(hasher)
    finally:
        os.close(fd)
    assert digest.sha256_hex == hashlib.sha256(data).hexdigest()
    assert digest.composite_b64 is None


def test_prefix_hasher_computes_the_s3_composite_checksum(tmp_path):
    data = os.urandom(5 * (1 << 20) + 7)
    parts = (2 << 20, 2 << 20, len(data) - (4 << 20))
    path = tmp_path / "f.part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        hasher = PrefixHasher(fd, len(data), parts)
        write_out_of_order(path, data, 300_000, hasher)
        hasher.all_written()
        digest = result_within(hasher)
    finally:
        os.close(fd)
    # S3's composite SHA-256: the sha256 of the concatenated part digests, base64.
    edges = [0, parts[0], parts[0] + parts[1], len(data)]
    part_digests = b"".join(
        hashlib.sha256(data[a:b]).digest() for a, b in itertools.pairwise(edges)
    )
    assert digest.composite_b64 == base64.b64encode(hashlib.sha256(part_digests).digest()).decode()
    assert digest.sha256_hex == hashlib.sha256(data).hexdigest()


def test_prefix_hasher_stops_when_the_transfer_fails(tmp_path):
    path = tmp_path / "f.part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        hasher = PrefixHasher(fd, 10 << 20, None)
        hasher.stop()  # returns only once the hashing thread has exited
    finally:
        os.close(fd)


def test_verify_names_the_source_of_the_expected_checksum():
    digest_hex = "ab" * 32
    ok = Expected("MODEL_SHA256", sha256_hex=digest_hex)
    verify("s3://b/k", ok, _digest(digest_hex))
    with pytest.raises(ModelSourceError, match="does not match the object's ChecksumSHA256"):
        verify(
            "s3://b/k",
            Expected("the object's ChecksumSHA256", sha256_hex="cd" * 32),
            _digest(digest_hex),
        )
    with pytest.raises(ModelSourceError, match="composite sha256 x does not match"):
        verify("s3://b/k", Expected("S3", composite_b64="y"), _digest(digest_hex, "x"))
    verify("s3://b/k", Expected(None), _digest(digest_hex))  # nothing to check against


def _digest(sha256_hex: str, composite: str | None = None):
    return Digest(sha256_hex, composite)


def test_marker_is_trusted_only_for_the_same_file(tmp_path):
    files = cache_files(tmp_path, S3Location("b", "m.gguf"))
    info = ObjectInfo(size=4, etag='"e"', version_id=None, checksum_sha256=None, composite=False)
    files.model.write_bytes(b"GGUF")
    assert read_marker(files, "s3://b/m.gguf") is None  # no marker: never trusted

    write_marker(files, "s3://b/m.gguf", info, "ab" * 32)
    marker = read_marker(files, "s3://b/m.gguf")
    assert marker is not None
    assert marker["sha256"] == "ab" * 32
    assert read_marker(files, "s3://other/m.gguf") is None

    replacement = tmp_path / "other"
    replacement.write_bytes(b"GGUF")
    os.replace(replacement, files.model)  # a different file under the same name
    assert read_marker(files, "s3://b/m.gguf") is None

    files.marker.write_text("{not json")
    assert read_marker(files, "s3://b/m.gguf") is None
    files.marker.write_text(json.dumps([1, 2]))
    assert read_marker(files, "s3://b/m.gguf") is None


def test_transfer_errors_are_one_line_naming_the_uri(tmp_path):
    import errno

    full = transfer_error("s3://b/k", tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert str(full) == f"model s3://b/k: no space left in {tmp_path} during download"
    denied = transfer_error(
        "s3://b/k", tmp_path, PermissionError(errno.EACCES, "Permission denied")
    )
    assert str(denied) == f"model s3://b/k: file error in {tmp_path} (Permission denied)"

    class RetriesExceeded(Exception):  # the shape of s3transfer's RetriesExceededError
        def __init__(self, last: Exception) -> None:
            super().__init__("Max Retries Exceeded")
            self.last_exception = last

    wrapped = transfer_error(
        "s3://b/k", tmp_path, RetriesExceeded(ValueError("line one\nline two"))
    )
    assert str(wrapped) == "model s3://b/k: download failed after retries: line one"
