"""GIVEN INFERENCE_ENGINE and the llama-server settings WHEN settings load and the engine is picked
THEN the command line gives each slot N_CTX tokens and admission lets every slot run."""

from __future__ import annotations

import pytest

from handler import config
from handler.config import ConfigError, available_cpus, load_settings
from handler.engine import create_engine
from handler.engine.in_process.engine import InProcessEngine
from handler.engine.llama_server.engine import LlamaServerEngine
from handler.engine.llama_server.process import child_environment, server_command


def test_defaults_keep_the_in_process_engine():
    settings = load_settings({})
    assert settings.inference_engine == "llama"
    assert settings.max_concurrency == 1
    assert isinstance(create_engine(settings), InProcessEngine)


def test_llama_server_admits_as_many_requests_as_it_has_slots():
    settings = load_settings({"INFERENCE_ENGINE": "llama-server", "PARALLEL_SLOTS": "16"})
    assert settings.max_concurrency == 16
    assert isinstance(create_engine(settings), LlamaServerEngine)  # built, not started


@pytest.mark.parametrize(
    ("env", "threads"),
    [
        # Every layer on the GPU: llama-server's CPU threads only feed it; four leave the rest.
        ({"N_GPU_LAYERS": "-1"}, 4),
        ({"N_GPU_LAYERS": "-1", "N_THREADS": "12"}, 12),  # set: kept
        ({"N_GPU_LAYERS": "20"}, "all"),  # layers on the CPU need every core
        ({"N_GPU_LAYERS": "0"}, "all"),
    ],
    ids=["all-on-gpu", "set", "partial", "cpu"],
)
def test_llama_server_threads_with_the_model_on_the_gpu(env, threads, monkeypatch):
    monkeypatch.setattr(config, "available_cpus", lambda: 16)  # a 16-core GPU host
    settings = load_settings({"INFERENCE_ENGINE": "llama-server", **env})
    # The field's own default (every usable CPU) is this machine's count.
    expected = available_cpus() if threads == "all" else threads
    assert settings.n_threads == expected
    command = server_command(settings, "/m.gguf", 1234)
    assert command[command.index("--threads") + 1] == str(expected)
    assert ("n_threads" in settings.set_by_environment) == ("N_THREADS" in env)


def test_a_machine_with_fewer_cores_than_that_gives_them_all(monkeypatch):
    monkeypatch.setattr(config, "available_cpus", lambda: 2)
    env = {"INFERENCE_ENGINE": "llama-server", "N_GPU_LAYERS": "-1"}
    assert load_settings(env).n_threads == 2


def test_the_in_process_engine_keeps_every_core_on_a_gpu(monkeypatch):
    monkeypatch.setattr(config, "available_cpus", lambda: 16)
    assert load_settings({"N_GPU_LAYERS": "-1"}).n_threads == available_cpus()


def test_explicit_max_concurrency_wins():
    settings = load_settings(
        {"INFERENCE_ENGINE": "llama-server", "PARALLEL_SLOTS": "16", "MAX_CONCURRENCY": "4"}
    )
    assert settings.max_concurrency == 4


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"INFERENCE_ENGINE": "vllm"}, "INFERENCE_ENGINE"),
        ({"PARALLEL_SLOTS": "0"}, "PARALLEL_SLOTS"),
    ],
)
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ConfigError, match=name):
        load_settings(env)


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_command_gives_each_slot_n_ctx_and_every_layer_to_the_gpu():
    settings = load_settings(
        {"N_CTX": "2048", "PARALLEL_SLOTS": "8", "N_GPU_LAYERS": "-1", "N_THREADS": "4"}
    )
    command = server_command(settings, "/m.gguf", 1234)
    assert command[0] == "llama-server"
    assert _flag(command, "--ctx-size") == str(2048 * 8)
    assert _flag(command, "--parallel") == "8"
    assert "--no-kv-unified" in command  # split cache: a slot can never be starved of context
    assert _flag(command, "--n-gpu-layers") == "all"
    assert _flag(command, "--host") == "127.0.0.1"
    assert _flag(command, "--port") == "1234"
    assert _flag(command, "--threads") == "4"
    assert "--no-warmup" in command


def test_command_warms_up_only_with_warmup_init_and_appends_extra_flags():
    settings = load_settings(
        {
            "WARMUP": "init",
            "N_GPU_LAYERS": "12",
            "LLAMA_SERVER_BIN": "/opt/llama/bin/llama-server",
            "LLAMA_SERVER_ARGS": "--flash-attn on --cache-type-k 'q8_0'",
        }
    )
    command = server_command(settings, "/m.gguf", 1)
    assert command[0] == "/opt/llama/bin/llama-server"
    assert "--no-warmup" not in command
    assert _flag(command, "--n-gpu-layers") == "12"
    assert command[-4:] == ["--flash-attn", "on", "--cache-type-k", "q8_0"]


@pytest.mark.parametrize(
    ("env", "ours", "verbosity"),
    [
        ({}, {}, "2"),  # warnings and errors: no dozen info lines per request to read
        ({"LOG_LEVEL": "debug"}, {}, None),  # the child's own default: we pass its lines on
        ({"AWS_LAMBDA_LOG_LEVEL": "DEBUG"}, {}, None),
        ({}, {"LLAMA_ARG_LOG_VERBOSITY": "4"}, "4"),  # set by whoever runs us: kept
    ],
)
def test_the_child_logs_warnings_and_errors_unless_told_otherwise(env, ours, verbosity):
    child = child_environment(load_settings(env), {"PATH": "/bin", **ours})
    assert child.get("LLAMA_ARG_LOG_VERBOSITY") == verbosity
    assert child["PATH"] == "/bin"  # the rest of our environment goes along
