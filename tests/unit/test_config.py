"""GIVEN environment variables WHEN settings load
THEN values are typed, and bad ones name the variable."""

from __future__ import annotations

import pytest

from handler.config import DEFAULT_MODEL_PATH, ConfigError, load_settings


def test_defaults_from_empty_environment():
    settings = load_settings({})
    assert settings.model_uri == DEFAULT_MODEL_PATH
    assert settings.warmup == "lazy"
    assert settings.init_budget_s == 8.0
    assert settings.n_threads >= 1
    assert settings.api_key is None


def test_values_are_parsed_from_environment_names():
    settings = load_settings(
        {"MODEL_URI": "s3://bucket/m.gguf", "N_CTX": "4096", "WARMUP": "init", "API_KEY": "k"}
    )
    assert settings.model_uri == "s3://bucket/m.gguf"
    assert settings.n_ctx == 4096
    assert settings.warmup == "init"
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k"


def test_unrelated_environment_is_ignored():
    assert load_settings({"PATH": "/bin", "HOME": "/root"}).model_uri == DEFAULT_MODEL_PATH


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"N_CTX": "lots"}, "N_CTX"),
        ({"WARMUP": "eager"}, "WARMUP"),
        ({"INIT_BUDGET_S": "11"}, "INIT_BUDGET_S"),
        ({"MODEL_SHA256": "abc"}, "MODEL_SHA256"),
        ({"PORT": "0"}, "PORT"),
    ],
)
def test_invalid_value_is_one_line_naming_the_variable(env, name):
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    message = str(info.value)
    assert name in message
    assert "\n" not in message


def test_api_key_is_never_echoed_in_errors():
    with pytest.raises(ConfigError):
        load_settings({"N_CTX": "x", "API_KEY": "sk-secret"})
    # The bad variable is N_CTX; the key is not part of the message either way.
    try:
        load_settings({"N_CTX": "x", "API_KEY": "sk-secret"})
    except ConfigError as exc:
        assert "sk-secret" not in str(exc)


def test_model_id_is_file_stem_unless_aliased():
    assert load_settings({"MODEL_URI": "/m/SmolLM2.Q4_1.gguf"}).model_id == "SmolLM2.Q4_1"
    assert load_settings({"MODEL_URI": "s3://b/k/x.gguf", "MODEL_ALIAS": "x"}).model_id == "x"


def test_sha256_is_normalised():
    digest = "B179C9523D0E6A0F98A330C7562B682750A6F8C8C15E5BC70EA373728110DB53"
    assert load_settings({"MODEL_SHA256": digest}).model_sha256 == digest.lower()


def test_threads_follow_a_cgroup_v2_quota(tmp_path):
    from handler.config import available_cpus

    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs of quota
    import os

    assert available_cpus(tmp_path) == min(len(os.sched_getaffinity(0)), 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_threads_follow_a_cgroup_v1_quota(tmp_path):
    from handler.config import available_cpus

    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu/cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu/cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu/cpu.cfs_quota_us").write_text("-1\n")
    assert available_cpus(tmp_path) >= 1


@pytest.mark.parametrize(
    ("text", "expected"), [("true", True), ("1", True), ("YES", True), ("off", False), ("0", False)]
)
def test_booleans_take_the_usual_words(text, expected):
    assert load_settings({"MODEL_VERIFY_HASH": text}).model_verify_hash is expected


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"MODEL_VERIFY_HASH": "maybe"}, "must be a boolean"),
        ({"WARMUP": "eager"}, "must be one of 'lazy', 'init', 'off'"),
        ({"N_CTX": "32"}, "greater than or equal to 64"),
        ({"INIT_BUDGET_S": "0"}, "greater than 0"),
        ({"INIT_BUDGET_S": "nan"}, "finite"),
        ({"S3_CONCURRENCY": "65"}, "less than or equal to 64"),
        ({"MODEL_URI": "  "}, "must not be empty"),
        ({"HEALTH_PORT": "0"}, "greater than or equal to 1"),
        ({"HEALTH_PORT": "70000"}, "less than or equal to 65535"),
        ({"HEALTH_STALE_S": "0"}, "greater than 0"),
    ],
)
def test_invalid_values_say_why(env, reason):
    with pytest.raises(ConfigError, match=reason):
        load_settings(env)


def test_the_api_key_is_masked_in_repr():
    settings = load_settings({"API_KEY": "sk-secret"})
    assert "sk-secret" not in repr(settings)
    assert "sk-secret" not in str(settings.api_key)


def test_settings_know_which_fields_the_environment_set():
    settings = load_settings({"N_THREADS": "3", "PORT": "9000", "UNRELATED": "x"})
    assert settings.set_by_environment == {"n_threads", "port"}
    assert load_settings({}).set_by_environment == frozenset()


def test_values_are_normalised_before_checks():
    settings = load_settings({"INVOKE_MODE": " response_stream ", "AWS_LAMBDA_LOG_FORMAT": "json"})
    assert settings.invoke_mode == "RESPONSE_STREAM"
    assert settings.aws_lambda_log_format == "JSON"
    assert load_settings({"AWS_LAMBDA_LOG_FORMAT": "anything"}).aws_lambda_log_format == "Text"


def test_settings_are_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        load_settings({}).n_ctx = 1  # type: ignore[misc]


def test_config_imports_without_pydantic():
    # The config is read before the model load starts on every cold start: pydantic must not be
    # part of that path (it waits for the web stack, which imports while the model loads).
    import subprocess
    import sys

    code = (
        "import sys, handler.config, handler.engine.in_process.engine, "
        "handler.engine.llama_server.engine, handler.aws_lambda.init; "
        "print('pydantic' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_the_health_port_is_off_unless_set():
    assert load_settings({}).health_port is None
    settings = load_settings({"HEALTH_PORT": "8081", "HEALTH_STALE_S": "5"})
    assert (settings.health_port, settings.health_stale_s) == (8081, 5.0)
