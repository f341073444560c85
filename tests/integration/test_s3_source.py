"""GIVEN MODEL_URI=s3://... on a real S3 API (moto server on 127.0.0.1, reached over HTTP by boto3)
WHEN the model source resolves it THEN the engine gets a verified local file or a one-line error,
and nothing partial is ever left in MODEL_CACHE_DIR."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from bench.common import free_port
from handler.aws_lambda.init import InitError, init
from handler.engine import EngineState, SamplingParams
from handler.engine.in_process.engine import InProcessEngine
from handler.engine.lifecycle import Lifecycle
from handler.model_source import ModelSourceError, resolve_model
from handler.model_source.s3_cache import cache_files
from handler.model_source.s3_checksum import PrefixHasher
from handler.model_source.s3_object import parse_s3_uri
from tests.conftest import ROOT, FakeContext, load_event, make_settings, model_path
from tests.integration.servers import wait_until

pytestmark = pytest.mark.integration

BUCKET = "models"
KEY = "smol/SmolLM2-135M-Instruct.Q4_1.gguf"
URI = f"s3://{BUCKET}/{KEY}"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
MOTO_SERVER = Path(sys.executable).with_name("moto_server")


class MotoServer:
    """A real moto S3 server process on a free 127.0.0.1 port."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = (log_dir / f"moto-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._answers, 30, self.proc)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                return True
        except OSError:
            return False

    def client(self, service: str = "s3", **credentials: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            **(credentials or CREDENTIALS),
        )

    def upload_model(self, bucket: str = BUCKET, key: str = KEY) -> None:
        s3 = self.client()
        s3.create_bucket(Bucket=bucket)
        # A single-part upload with SHA256: S3 then stores a full-object checksum.
        s3.put_object(
            Bucket=bucket, Key=key, Body=model_path().read_bytes(), ChecksumAlgorithm="SHA256"
        )

    def enforce_iam(self) -> None:
        """From now on every request must be signed by an IAM identity allowed to make it."""
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0",  # requests served without checking auth: none from now on
            headers={"Content-Type": "text/plain"},  # a form body would hide the data from moto
        )
        urllib.request.urlopen(request, timeout=5).close()

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        self.signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials; no profile, config file or instance metadata can leak in."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One server with the model uploaded, for tests that leave it running and unchanged."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        server.upload_model()
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A server of this test's own, which it may pause, kill or lock down."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


def s3_settings(server: MotoServer, cache_dir: Path, **overrides: Any) -> Any:
    return make_settings(
        MODEL_URI=URI, S3_ENDPOINT_URL=server.endpoint, MODEL_CACHE_DIR=cache_dir, **overrides
    )


def leftovers(cache_dir: Path) -> list[str]:
    """Everything in the cache directory but lock files (kept on purpose: see s3_cache)."""
    if not cache_dir.exists():
        return []
    return sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock"))


def resolve_error(settings: Any, progress: Callable[[int, int], None] | None = None) -> str:
    with pytest.raises(ModelSourceError) as info:
        resolve_model(settings, progress)
    message = str(info.value)
    assert "\n" not in message
    assert settings.model_uri in message
    return message


# --------------------------------------------------------------------------- happy path


def test_happy_path_downloads_verifies_loads_and_generates(s3, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="coldstart.s3")
    engine = InProcessEngine(s3_settings(s3, tmp_path / "cache"))
    engine.start()
    assert engine.wait_loaded(120) is EngineState.READY, engine.status().reason

    status = engine.status()
    size = model_path().stat().st_size
    assert status.download == (size, size)
    assert status.model_bytes == size
    files = cache_files(tmp_path / "cache", parse_s3_uri(URI))
    assert status.model_path == str(files.model)
    assert leftovers(tmp_path / "cache") == sorted([files.model.name, files.marker.name])
    marker = json.loads(files.marker.read_text())
    assert marker["size"] == size
    # Verified against the object's own full-object ChecksumSHA256 (no MODEL_SHA256 set).
    assert any("downloaded and verified" in r.getMessage() for r in caplog.records)

    generation = engine.generate(
        engine.tokenize("The capital of France is"), SamplingParams(max_tokens=4, temperature=0)
    )
    assert generation.text()
    assert generation.result.completion_tokens > 0


def test_model_sha256_pins_the_download(s3, tmp_path):
    from handler.model_source import sha256_file

    pinned = sha256_file(model_path())
    resolved = resolve_model(s3_settings(s3, tmp_path, MODEL_SHA256=pinned))
    assert resolved.sha256 == pinned
    assert resolved.source == "s3"


def test_multipart_object_with_a_composite_checksum(s3, tmp_path, caplog):
    """A multipart upload's ChecksumSHA256 covers its parts' checksums, not the bytes: the fetch
    must not compare it with the file's sha256. moto gives no part sizes (GetObjectAttributes
    ObjectParts), so the fetch falls back to the size check, and we check our composite math
    against the value the server computed."""
    data = model_path().read_bytes()
    key = "smol/multipart.gguf"
    parts = (64 << 20, len(data) - (64 << 20))
    client = s3.client()
    upload = client.create_multipart_upload(Bucket=BUCKET, Key=key, ChecksumAlgorithm="SHA256")
    done, start = [], 0
    for number, size in enumerate(parts, start=1):
        part = client.upload_part(
            Bucket=BUCKET,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=data[start : start + size],
            ChecksumAlgorithm="SHA256",
        )
        done.append(
            {"PartNumber": number, "ETag": part["ETag"], "ChecksumSHA256": part["ChecksumSHA256"]}
        )
        start += size
    client.complete_multipart_upload(
        Bucket=BUCKET, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": done}
    )
    caplog.set_level(logging.INFO, logger="coldstart.s3")

    settings = make_settings(
        MODEL_URI=f"s3://{BUCKET}/{key}", S3_ENDPOINT_URL=s3.endpoint, MODEL_CACHE_DIR=tmp_path
    )
    resolved = resolve_model(settings)
    assert any("composite checksum" in r.getMessage() for r in caplog.records)

    fd = os.open(resolved.path, os.O_RDONLY)
    try:
        hasher = PrefixHasher(fd, len(data), parts)
        hasher.all_written()
        digest = hasher.result()
    finally:
        os.close(fd)
    head = client.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    assert digest.composite_b64 == head["ChecksumSHA256"].split("-")[0]
    assert digest.sha256_hex == resolved.sha256


# --------------------------------------------------------------------------- cached reuse


def test_verified_cache_file_is_reused_without_downloading_again(s3, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="coldstart.s3")
    settings = s3_settings(s3, tmp_path)
    first = resolve_model(settings)
    before = first.path.stat()

    second = resolve_model(settings)
    after = second.path.stat()
    assert second == first
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert any("reusing verified cache file" in r.getMessage() for r in caplog.records)


def test_pinned_cache_file_is_reused_even_when_s3_is_unreachable(s3, tmp_path):
    resolved = resolve_model(s3_settings(s3, tmp_path))
    dead = f"http://127.0.0.1:{free_port()}"
    offline = make_settings(
        MODEL_URI=URI, S3_ENDPOINT_URL=dead, MODEL_CACHE_DIR=tmp_path, MODEL_SHA256=resolved.sha256
    )
    assert resolve_model(offline).path == resolved.path


@pytest.mark.parametrize("damage", ["no marker", "file rewritten"])
def test_cache_file_is_not_trusted_without_a_matching_marker(s3, tmp_path, damage, caplog):
    from handler.model_source import sha256_file

    settings = s3_settings(s3, tmp_path)
    first = resolve_model(settings)
    files = cache_files(tmp_path, parse_s3_uri(URI))
    if damage == "no marker":
        files.marker.unlink()
    else:
        with first.path.open("r+b") as f:  # same size, different bytes
            f.seek(1000)
            f.write(b"\0" * 16)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="coldstart.s3")

    second = resolve_model(settings)
    assert any("downloaded and verified" in r.getMessage() for r in caplog.records)
    assert sha256_file(second.path) == first.sha256


# --------------------------------------------------------------------------- clear errors


def test_wrong_checksum_is_a_clear_init_error_and_leaves_no_file(s3, tmp_path):
    settings = s3_settings(s3, tmp_path, MODEL_SHA256="0" * 64)
    message = resolve_error(settings)
    assert "does not match MODEL_SHA256" in message
    assert leftovers(tmp_path) == []

    with pytest.raises(InitError) as info:
        init(time.perf_counter(), settings)
    assert str(info.value).startswith(f"model {URI}: sha256 ")
    assert leftovers(tmp_path) == []


def test_missing_object(s3, tmp_path):
    settings = make_settings(
        MODEL_URI=f"s3://{BUCKET}/smol/missing.gguf",
        S3_ENDPOINT_URL=s3.endpoint,
        MODEL_CACHE_DIR=tmp_path,
    )
    assert "object not found in bucket 'models'" in resolve_error(settings)
    assert leftovers(tmp_path) == []


def test_missing_bucket(s3, tmp_path):
    settings = make_settings(
        MODEL_URI="s3://no-such-bucket/model.gguf",
        S3_ENDPOINT_URL=s3.endpoint,
        MODEL_CACHE_DIR=tmp_path,
    )
    assert "bucket 'no-such-bucket' does not exist" in resolve_error(settings)
    assert leftovers(tmp_path) == []


def test_access_denied(fresh_s3, tmp_path, monkeypatch):
    fresh_s3.upload_model()
    iam = fresh_s3.client("iam")
    iam.create_user(UserName="no-s3-access")
    key = iam.create_access_key(UserName="no-s3-access")["AccessKey"]
    fresh_s3.enforce_iam()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])

    message = resolve_error(s3_settings(fresh_s3, tmp_path))
    assert "access denied" in message
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- failures mid-way


def test_server_killed_mid_download_retries_then_fails_cleanly(fresh_s3, tmp_path, caplog):
    fresh_s3.upload_model()
    caplog.set_level(logging.DEBUG, logger="botocore.retries.standard")
    caplog.set_level(logging.DEBUG, logger="s3transfer.download")

    def kill_on_first_bytes(done: int, total: int) -> None:
        if done > 0:
            fresh_s3.signal(signal.SIGKILL)

    settings = s3_settings(fresh_s3, tmp_path, S3_MAX_ATTEMPTS="2")
    message = resolve_error(settings, kill_on_first_bytes)
    assert "download failed after retries" in message
    assert leftovers(tmp_path) == []
    retried = [r for r in caplog.records if "retry" in r.getMessage().lower()]
    assert retried, "expected botocore or s3transfer to retry before giving up"


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount size-limited tmpfs directories (needs root or CAP_SYS_ADMIN)."""
    mounts: list[Path] = []

    def mount(size_bytes: int) -> Path:
        target = tmp_path / f"tmpfs-{len(mounts)}"
        target.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a size-limited tmpfs here: {done.stderr.strip()}")
        mounts.append(target)
        return target

    try:
        yield mount
    finally:
        for target in mounts:
            subprocess.run(["umount", "-l", str(target)], check=False)


def test_cache_directory_too_small_is_refused_before_downloading(s3, small_tmpfs):
    cache = small_tmpfs(50 << 20)
    message = resolve_error(s3_settings(s3, cache))
    assert f"needs 98.4 MB in {cache} but only 52.4 MB is free" in message
    assert leftovers(cache) == []


def test_disk_filling_up_mid_download_fails_cleanly(s3, small_tmpfs):
    size = model_path().stat().st_size
    cache = small_tmpfs(size + (4 << 20))
    filler = cache / "someone-else"

    def fill_disk_on_first_bytes(done: int, total: int) -> None:
        if done > 0 and not filler.exists():
            stat = os.statvfs(cache)
            with filler.open("wb") as f, contextlib.suppress(OSError):
                f.write(b"\0" * (stat.f_bavail * stat.f_frsize))  # the download then hits ENOSPC

    message = resolve_error(s3_settings(s3, cache), fill_disk_on_first_bytes)
    assert "no space left" in message
    assert leftovers(cache) == ["someone-else"]


# --------------------------------------------------------------------------- sharing


RESOLVE_SCRIPT = """
import json, logging, sys
from handler.config import load_settings
from handler.model_source import resolve_model
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
resolved = resolve_model(load_settings())
print(json.dumps({"path": str(resolved.path), "sha256": resolved.sha256}))
"""


def access_log_lines(server: MotoServer, log_bucket: str) -> list[str]:
    s3 = server.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=log_bucket).get("Contents", [])]
    return [s3.get_object(Bucket=log_bucket, Key=k)["Body"].read().decode() for k in keys]


def test_two_processes_cold_starting_together_download_once(fresh_s3, tmp_path):
    fresh_s3.upload_model()
    s3 = fresh_s3.client()
    # S3 server access logging is the server's own record of every request it served.
    s3.create_bucket(Bucket="access-logs")
    s3.put_bucket_acl(
        Bucket="access-logs",
        GrantWrite='uri="http://acs.amazonaws.com/groups/s3/LogDelivery"',
        GrantReadACP='uri="http://acs.amazonaws.com/groups/s3/LogDelivery"',
    )
    s3.put_bucket_logging(
        Bucket=BUCKET,
        BucketLoggingStatus={"LoggingEnabled": {"TargetBucket": "access-logs", "TargetPrefix": ""}},
    )
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MODEL_URI": URI,
        "S3_ENDPOINT_URL": fresh_s3.endpoint,
        "MODEL_CACHE_DIR": str(cache),
        "S3_PART_SIZE_MB": "16",
    }
    files = cache_files(cache, parse_s3_uri(URI))
    # Hold the lock so both processes are surely starting together, then let them race.
    with files.lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        procs, errs = [], []
        for n in range(2):
            err = (tmp_path / f"proc{n}.err").open("w+")
            errs.append(err)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", RESOLVE_SCRIPT],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                )
            )
        logs = [Path(e.name) for e in errs]
        wait_until(lambda: all("waiting for another process" in p.read_text() for p in logs), 60)
        fcntl.flock(held, fcntl.LOCK_UN)
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, "\n".join(p.read_text() for p in logs)
        outputs.append(json.loads(out))
    for err in errs:
        err.close()

    assert outputs[0] == outputs[1]
    assert outputs[0]["path"] == str(files.model)
    texts = [p.read_text() for p in logs]
    assert sum("downloaded and verified" in t for t in texts) == 1
    assert sum("reusing verified cache file" in t for t in texts) == 1
    requests = access_log_lines(fresh_s3, "access-logs")
    gets = [line for line in requests if f"GET /{BUCKET}/{KEY} " in line]
    parts = math.ceil(model_path().stat().st_size / (16 << 20))
    assert len(gets) == parts  # one download's ranged GETs, not two


# --------------------------------------------------------------------------- Lambda init


def readyz_event() -> dict[str, Any]:
    """The function URL GET sample, aimed at the readiness probe."""
    event = load_event("function-url-models.json")
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/readyz"
    return event


def test_slow_download_continues_after_init_and_requests_get_503_until_loaded(
    fresh_s3, tmp_path, monkeypatch
):
    """GIVEN a download that outlasts INIT_BUDGET_S WHEN requests arrive THEN init has returned,
    the ping and readiness show download progress, a request out of time gets 503 + Retry-After,
    and once the download completes the next request is served."""
    fresh_s3.upload_model()
    original = Lifecycle.on_download_progress

    def pause_server_on_first_bytes(self: Lifecycle, done: int, total: int) -> None:
        original(self, done, total)
        if done > 0 and not getattr(self, "_test_paused", False):
            self._test_paused = True  # type: ignore[attr-defined]
            fresh_s3.signal(signal.SIGSTOP)  # the download stalls until SIGCONT

    monkeypatch.setattr(Lifecycle, "on_download_progress", pause_server_on_first_bytes)
    settings = s3_settings(fresh_s3, tmp_path, INIT_BUDGET_S="0.5", S3_CONCURRENCY="2")
    app = init(time.perf_counter(), settings)
    try:
        wait_until(lambda: app.engine.status().download is not None, 60)
        assert app.engine.state is EngineState.LOADING

        ping = app(load_event("eventbridge-keep-warm.json"), FakeContext(remaining_ms=1500))
        assert ping["ok"] is False
        assert ping["state"] == "loading"
        assert 0 < ping["download"]["bytes_done"] < ping["download"]["bytes_total"]

        readiness = app(readyz_event(), FakeContext())
        assert readiness["statusCode"] == 503
        assert json.loads(readiness["body"])["download"]["bytes_done"] > 0

        response = app(load_event("function-url-chat.json"), FakeContext(remaining_ms=1500))
        assert response["statusCode"] == 503
        assert int(response["headers"]["retry-after"]) > 0
    finally:
        fresh_s3.signal(signal.SIGCONT)

    assert app.engine.wait_loaded(120) is EngineState.READY, app.engine.status().reason
    response = app(load_event("function-url-chat.json"), FakeContext(remaining_ms=60_000))
    assert response["statusCode"] == 200
    assert json.loads(response["body"])["choices"][0]["message"]["content"]
