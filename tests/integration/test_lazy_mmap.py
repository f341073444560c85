"""GIVEN the lazy_mmap shim WHEN a file is mapped read-only with MAP_POPULATE
THEN the mapping is created without faulting the file in; without the shim it is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, model_path

pytestmark = pytest.mark.integration

SHIM = Path(os.environ.get("LAZY_MMAP_LIB", Path.home() / ".cache/coldstart/lib/liblazy_mmap.so"))

MAP_AND_MEASURE = r"""
import mmap, sys
path = sys.argv[1]
with open(path, "rb") as f:
    m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    start = None
    rss = 0
    for line in open("/proc/self/smaps"):
        if path in line:
            start = True
        elif start and line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
            break
    print(rss, len(m))
"""


def mapped_resident_bytes(preload: Path | None) -> tuple[int, int]:
    env = {"PATH": os.environ["PATH"]}
    if preload is not None:
        env["LD_PRELOAD"] = str(preload)
    out = subprocess.run(
        [sys.executable, "-c", MAP_AND_MEASURE, str(model_path())],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


@pytest.fixture(scope="module")
def shim() -> Path:
    if not SHIM.is_file():
        pytest.fail(f"{SHIM} missing: `make test` builds it (make lazy-mmap)")
    return SHIM


def test_without_shim_populate_faults_the_whole_file_in():
    resident, size = mapped_resident_bytes(None)
    assert resident > size * 0.9


def test_with_shim_the_mapping_is_lazy(shim):
    resident, size = mapped_resident_bytes(shim)
    assert resident < size * 0.1


def test_engine_loads_and_generates_under_the_shim(shim):
    code = (
        "from handler.lambda_function import handler; "
        "r = handler({'prompt': 'The capital of France is', 'max_tokens': 4, 'temperature': 0},"
        " None); print(r['usage']['completion_tokens'], handler.engine.status().as_dict()"
        "['lazy_mmap'])"
    )
    env = {
        "PATH": os.environ["PATH"],
        "LD_PRELOAD": str(shim),
        "PYTHONPATH": str(ROOT),
        "MODEL_URI": str(model_path()),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[-1].split() == ["4", "True"]  # earlier lines are the EMF metrics
