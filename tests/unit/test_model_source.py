"""GIVEN model URIs WHEN resolved THEN only a real GGUF file passes, with one-line errors."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from types import ModuleType

import pytest

import handler.model_source
from handler.config import load_settings
from handler.model_source import ModelSourceError, local_path, resolve_model
from tests.conftest import ROOT


def gguf_bytes(extra: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<I", 3) + struct.pack("<QQ", 0, 0) + extra


def resolve(uri: str, **env):
    return resolve_model(load_settings({"MODEL_URI": uri, **env}))


def test_plain_path_and_file_uri_resolve_in_place(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(gguf_bytes())
    assert resolve(str(model)).path == model
    resolved = resolve(f"file://{model}")
    assert resolved.path == model
    assert resolved.size_bytes == model.stat().st_size
    assert resolved.source == "local"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "too small"),
        (b"NOPE" + b"\0" * 40, "not a GGUF"),
        (b"GGUF" + struct.pack("<I", 99) + b"\0" * 16, "unsupported GGUF version"),
    ],
)
def test_bad_files_fail_with_one_line_naming_the_path(tmp_path, content, fragment):
    model = tmp_path / "bad.gguf"
    model.write_bytes(content)
    with pytest.raises(ModelSourceError) as info:
        resolve(str(model))
    assert fragment in str(info.value)
    assert str(model) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelSourceError, match="file not found"):
        resolve(str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelSourceError, match="not a regular file"):
        resolve(str(tmp_path))


def test_unsupported_scheme():
    with pytest.raises(ModelSourceError, match="unsupported scheme"):
        local_path("https://example.invalid/m.gguf")


def test_size_and_hash_checks(tmp_path):
    model = tmp_path / "m.gguf"
    data = gguf_bytes(b"weights")
    model.write_bytes(data)
    with pytest.raises(ModelSourceError, match="MODEL_SIZE_BYTES"):
        resolve(str(model), MODEL_SIZE_BYTES=str(len(data) + 1))
    assert resolve(str(model), MODEL_SIZE_BYTES=str(len(data))).size_bytes == len(data)
    good = hashlib.sha256(data).hexdigest()
    with pytest.raises(ModelSourceError, match="does not match MODEL_SHA256"):
        resolve(str(model), MODEL_SHA256="0" * 64, MODEL_VERIFY_HASH="true")
    assert resolve(str(model), MODEL_SHA256=good, MODEL_VERIFY_HASH="true").sha256 == good
    # Without MODEL_VERIFY_HASH the (slow) hash is skipped for local files.
    assert resolve(str(model), MODEL_SHA256="0" * 64).sha256 is None


def test_importing_the_package_loads_neither_boto3_nor_the_s3_modules():
    """The Lambda init imports it before the model load starts; only s3:// models pay for boto3."""
    code = (
        "import json, sys, handler.model_source\n"
        "heavy = ('boto3', 'botocore', 's3transfer', 'handler.model_source.s3_')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(heavy))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == []


def test_all_lists_exactly_the_public_names():
    namespace = vars(handler.model_source).items()
    public = {n for n, v in namespace if not n.startswith("_") and not isinstance(v, ModuleType)}
    assert public == set(handler.model_source.__all__)
