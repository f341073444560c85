"""GIVEN the real model WHEN it is prefetched THEN the reads come in the order the first forward
pass needs (header, token embedding, block 0, 1, ..., the rest), cover the file exactly once, stop
at the memory budget, and `resident_bytes` sees the pages arrive in the page cache."""

from __future__ import annotations

import itertools
import os
import re
import shutil
from pathlib import Path

import pytest

from bench.common import evict_from_page_cache
from handler.model_source.prefetch import (
    Prefetch,
    memory_budget,
    need_order,
    read_plan,
    resident_bytes,
    tensor_extents,
)

pytestmark = pytest.mark.integration


def test_extents_tile_the_data_section(real_model: Path):
    header_end, extents = tensor_extents(real_model)
    assert extents[0].offset >= header_end
    for a, b in itertools.pairwise(extents):
        assert a.offset + a.size == b.offset  # tensors in file order, no gaps, no overlap
    assert extents[-1].offset + extents[-1].size == real_model.stat().st_size


def test_need_order_is_blocks_by_layer_then_the_rest_and_the_embedding_last(real_model: Path):
    names = [e.name for e in need_order(tensor_extents(real_model)[1])]
    assert names[0].startswith("blk.0.")
    assert names[-1] == "token_embd.weight"  # the first pass needs only the prompt's rows
    layers = [int(m.group(1)) for n in names if (m := re.match(r"blk\.(\d+)\.", n))]
    assert layers == sorted(layers)
    first_other = next(i for i, n in enumerate(names) if not n.startswith("blk."))
    assert all(not n.startswith("blk.") for n in names[first_other:])


def test_plan_covers_the_file_once_in_need_order(real_model: Path):
    size = real_model.stat().st_size
    plan = read_plan(real_model, budget_bytes=size * 2, chunk_bytes=1 << 20)
    assert sum(n for _, n in plan) == size
    covered = sorted(plan)
    for (a, n), (b, _) in itertools.pairwise(covered):
        assert a + n == b
    header_end, extents = tensor_extents(real_model)
    embd = next(e for e in extents if e.name == "token_embd.weight")
    block0 = min(e.offset for e in extents if e.name.startswith("blk.0."))
    assert plan[0][0] == 0  # the header first
    assert next(off for off, _ in plan if off >= header_end) == block0  # then block 0
    assert plan[-1][0] + plan[-1][1] == embd.offset + embd.size  # the embedding last


def test_plan_stops_at_the_memory_budget(real_model: Path):
    plan = read_plan(real_model, budget_bytes=10 << 20, chunk_bytes=1 << 20)
    assert sum(n for _, n in plan) == 10 << 20
    assert memory_budget(reserve_bytes=1 << 60) == 0  # a reserve above memory leaves nothing


def test_prefetch_reads_everything_into_the_page_cache(real_model: Path, tmp_path: Path):
    copy = evicted_copy(real_model, tmp_path)
    before, size = resident_bytes(copy)
    assert before < size // 2, "the copy should start mostly out of the page cache"
    prefetch = Prefetch(copy, readers=8, budget_bytes=size).start()
    assert prefetch.wait(60)
    assert prefetch.status()["bytes_read"] == size and prefetch.error is None
    assert resident_bytes(copy)[0] >= size * 0.95


def test_a_file_that_is_not_gguf_is_read_front_to_back(tmp_path: Path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(3 << 20))
    plan = read_plan(blob, budget_bytes=1 << 30, chunk_bytes=1 << 20)
    assert plan == [(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 1 << 20)]


def test_a_missing_file_ends_the_prefetch_with_an_error(tmp_path: Path):
    prefetch = Prefetch(tmp_path / "gone.gguf", budget_bytes=1 << 20).start()
    assert prefetch.wait(10)
    assert "gone.gguf" in str(prefetch.error)


def evicted_copy(real_model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "evicted.gguf"
    shutil.copyfile(real_model, copy)
    evict_from_page_cache(copy)
    return copy


@pytest.mark.parametrize(
    "env",
    [
        {"PREFETCH": "off"},
        {"MODEL_URI": "s3://bucket/model.gguf"},
        {"PREFETCH_READERS": "many"},
        {"MODEL_URI": "/nonexistent/model.gguf"},
        # Its engine starts the read-ahead once the child is up and our imports are done.
        {"INFERENCE_ENGINE": "llama-server"},
    ],
)
def test_no_early_prefetch_where_there_is_nothing_local_to_read(
    env, real_model, monkeypatch, tmp_path
):
    from handler.model_source import prefetch

    monkeypatch.setattr(prefetch, "_EARLY", [])
    copy = evicted_copy(real_model, tmp_path)  # out of the page cache: worth prefetching
    assert prefetch.start_early({"MODEL_URI": str(copy), **env}) is None
    control = prefetch.start_early({"MODEL_URI": str(copy)})
    assert control is not None and control.wait(60)


def test_the_early_prefetch_starts_once_per_process(real_model, tmp_path, monkeypatch):
    from handler.model_source import prefetch

    monkeypatch.setattr(prefetch, "_EARLY", [])
    copy = evicted_copy(real_model, tmp_path)
    first = prefetch.start_early({"MODEL_URI": f"file://{copy}", "PREFETCH_READERS": "4"})
    assert first is not None and first.readers == 4
    assert prefetch.start_early({"MODEL_URI": str(copy)}) is first  # awslambdaric's import
    assert first.wait(60)


def test_a_model_already_in_memory_is_not_read_again(real_model: Path):
    from handler.model_source.prefetch import start

    with real_model.open("rb") as f:
        while f.read(8 << 20):
            pass
    assert start(real_model) is None


def test_init_starts_no_prefetch_for_the_llama_server_engine(real_model, tmp_path):
    from handler.config import load_settings
    from handler.model_source.prefetch import start_at_init

    copy = evicted_copy(real_model, tmp_path)
    slots = load_settings({"MODEL_URI": str(copy), "INFERENCE_ENGINE": "llama-server"})
    assert start_at_init(slots) is None
    in_process = start_at_init(load_settings({"MODEL_URI": str(copy)}))
    assert in_process is not None and in_process.wait(60)
