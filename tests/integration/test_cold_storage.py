"""The cold-storage simulator (bench/cold_storage.py): the real default model through nbdkit's rate
and delay filters and nbdfuse, read back byte for byte, throttled, and torn down afterwards."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from bench import cold_storage
from bench.cold_storage import PROFILES, drop_page_cache, mounted, parallel_read, resident_bytes

pytestmark = pytest.mark.integration

DEFAULT_MODEL = Path.home() / ".cache/coldstart/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PROFILE = PROFILES["latency"]

if missing := [tool for tool in ("nbdkit", "nbdfuse") if shutil.which(tool) is None]:
    pytest.skip(
        f"{' and '.join(missing)} not installed: run `make cold-storage-deps`",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def model() -> Path:
    path = Path(os.environ.get("COLDSTART_TEST_MODEL", DEFAULT_MODEL))
    if not path.is_file():
        pytest.fail(f"default model missing at {path}: run `make model` (make test does)")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def helpers_of(workdir: Path) -> list[str]:
    """Command lines of live processes that name the simulator's working directory."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(workdir) in cmdline:
            found.append(cmdline)
    return found


def assert_torn_down(workdir: Path) -> None:
    mountdir = workdir / "mnt"
    assert not cold_storage.is_mounted(mountdir)
    assert not mountdir.exists()
    assert not workdir.exists()
    assert helpers_of(workdir) == []


def test_bytes_match_reads_are_throttled_and_all_is_stopped(model):
    # GIVEN the model mounted through the latency profile
    with mounted(model, PROFILE) as path:
        workdir = path.parent.parent
        assert path.name == "nbd"
        assert path.stat().st_size == model.stat().st_size
        assert resident_bytes(path) == 0
        assert len(helpers_of(workdir)) == 2  # nbdkit and nbdfuse

        # WHEN it is read in full, cold, by parallel readers, THEN it takes at least the
        # link's time (a loose lower bound only)
        floor = parallel_read(path, readers=16)
        assert floor.seconds >= 0.5 * PROFILE.min_seconds(model.stat().st_size)
        assert floor.mb_per_s > 0

        # AND the pages stay cached across opens until dropped
        assert resident_bytes(path) > model.stat().st_size // 2
        drop_page_cache(path)
        assert resident_bytes(path) == 0

        # AND a sequential read through the mount gives the original's bytes
        started = time.perf_counter()
        assert sha256(path) == sha256(model)
        assert time.perf_counter() - started >= 0.5 * PROFILE.min_seconds(model.stat().st_size)

    # THEN both helpers are stopped, the file system unmounted and its directory removed
    assert_torn_down(workdir)


def test_an_error_inside_tears_everything_down_even_with_the_file_open(model):
    workdir, held = None, None
    try:
        with pytest.raises(RuntimeError, match="boom"), mounted(model, "bandwidth") as path:
            workdir = path.parent.parent
            held = path.open("rb")  # still open when the block exits: the mount is busy
            held.read(4096)
            raise RuntimeError("boom")
        assert workdir is not None
        assert_torn_down(workdir)
    finally:
        if held is not None:
            held.close()


def test_unknown_profile_and_missing_model_are_refused(model, tmp_path):
    with pytest.raises(ValueError, match="unknown profile"), mounted(model, "fast"):
        pass
    with pytest.raises(FileNotFoundError), mounted(tmp_path / "absent.gguf"):
        pass
