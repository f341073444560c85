"""GIVEN our slot engine's llama-server command line WHEN bench.p6_one_stream derives a variant
THEN exactly the one setting it names changes, and the combined variant takes only the helpers."""

from __future__ import annotations

import pytest

from bench.p6_one_stream import (
    VARIANTS,
    helping_changes,
    replace_option,
    variant_command,
)
from handler.config import load_settings
from handler.engine.llama_server.process import server_command

SETTINGS = load_settings(
    {"PARALLEL_SLOTS": "64", "N_CTX": "1024", "INFERENCE_ENGINE": "llama-server"}
)
BASE = server_command(SETTINGS, "/m.gguf", 0)


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_replace_option_replaces_the_value_or_appends_the_option():
    assert replace_option(["x", "--port", "0", "--y"], "--port", "9") == ["x", "--port", "9", "--y"]
    assert replace_option(["x"], "--flash-attn", "on") == ["x", "--flash-attn", "on"]


def test_shipped_is_the_slot_engines_command_unchanged():
    command, env = variant_command(["shipped"], BASE, {"A": "1"}, 1024)
    assert command == BASE
    assert env == {"A": "1"}


def test_one_slot_keeps_one_slots_context():
    command, _ = variant_command(["one-slot"], BASE, {}, 1024)
    assert (option(BASE, "--parallel"), option(BASE, "--ctx-size")) == ("64", "65536")
    assert (option(command, "--parallel"), option(command, "--ctx-size")) == ("1", "1024")


def test_kv_unified_replaces_the_split_cache_flag():
    command, _ = variant_command(["kv-unified"], BASE, {}, 1024)
    assert "--no-kv-unified" in BASE
    assert "--kv-unified" in command and "--no-kv-unified" not in command
    assert len(command) == len(BASE)


@pytest.mark.parametrize(("name", "value"), [("fa-on", "on"), ("fa-off", "off")])
def test_flash_attention_variants_set_the_flag(name, value):
    command, _ = variant_command([name], BASE, {}, 1024)
    assert option(command, "--flash-attn") == value


def test_cuda_graphs_variant_changes_only_the_environment():
    command, env = variant_command(["no-cuda-graphs"], BASE, {}, 1024)
    assert command == BASE
    assert env == {"GGML_CUDA_DISABLE_GRAPHS": "1"}


def test_changes_combine_in_order():
    command, _ = variant_command(["one-slot", "fa-on", "backend-sampling"], BASE, {}, 1024)
    assert option(command, "--parallel") == "1"
    assert option(command, "--flash-attn") == "on"
    assert command[-1] == "--backend-sampling"


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        variant_command(["turbo"], BASE, {}, 1024)


def test_only_changes_that_beat_shipped_by_the_margin_combine_and_one_flash_attention():
    rows = {
        "shipped": {"server_tps": 100.0},
        "one-slot": {"server_tps": 102.0},  # under the 3% margin
        "kv-unified": {"server_tps": 104.0},
        "fa-off": {"server_tps": 105.0},
        "fa-on": {"server_tps": 108.0},
        "threads-all": {"error": "failed"},
    }
    assert helping_changes(rows) == ["kv-unified", "fa-on"]
    assert helping_changes({"fa-on": {"server_tps": 9.0}}) == []
    assert set(VARIANTS) >= {"shipped", "one-slot", "kv-unified", "fa-on", "fa-off"}
