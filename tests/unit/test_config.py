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
