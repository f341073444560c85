"""GIVEN the settings of a process about to start WHEN the entry point asks for llama-server's
child at the first instant THEN it is spawned only where the engine would read the same local
file at once, and the engine's package costs nothing to import before that."""

from __future__ import annotations

import subprocess
import sys

import pytest

from handler.engine.llama_server import early
from tests.conftest import make_settings, model_path


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"MODEL_URI": "s3://bucket/model.gguf"}, "an s3:// model is downloaded first"),
        ({"MODEL_URI": "/nonexistent/model.gguf"}, "no file: the engine reports it"),
        ({"MODEL_URI": "http://host/model.gguf"}, "a scheme the engine rejects"),
        (
            {"MODEL_VERIFY_HASH": "true", "MODEL_SHA256": "ab" * 32},
            "a pinned hash is checked before anything reads the file",
        ),
    ],
)
def test_no_local_path_where_the_engine_must_check_or_fetch_first(overrides, why):
    assert early.local_model_path(make_settings(**overrides)) is None, why


def test_a_plain_path_and_a_file_uri_give_the_path_the_engine_resolves():
    path = model_path()
    assert early.local_model_path(make_settings(MODEL_URI=str(path))) == str(path)
    assert early.local_model_path(make_settings(MODEL_URI=f"file://{path}")) == str(path)


@pytest.mark.parametrize(
    ("environ", "under_awslambdaric"),
    [
        ({"INFERENCE_ENGINE": "llama"}, False),  # the in-process engine has no child
        ({"INFERENCE_ENGINE": "llama-server", "N_CTX": "not a number"}, False),
        ({"INFERENCE_ENGINE": "llama-server", "LLAMA_SERVER_BIN": "/nonexistent/llama"}, False),
        # awslambdaric (RUNTIME=auto, buffered, one at a time) sets up its own logging.
        ({"INFERENCE_ENGINE": "llama-server"}, True),
    ],
)
def test_nothing_is_spawned_where_the_engine_must_start_the_child(environ, under_awslambdaric):
    environ = {"MODEL_URI": str(model_path()), **environ}
    assert early.spawn(environ, under_awslambdaric=under_awslambdaric) is None
    assert early.take(make_settings(), str(model_path())) is None  # nothing to take over


def test_the_engine_package_imports_nothing_heavy():
    """The early spawn imports `handler.engine` (a package above it): the contract, the model
    sources and the prefetch wait until something asks for them."""
    code = (
        "import sys, handler.engine.llama_server.early, handler.engine; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('handler'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    assert "handler.engine.llama_server.process" in loaded
    for heavy in (
        "handler.engine.contract",
        "handler.engine.llama_server.engine",
        "handler.model_source",
        "handler.model_source.prefetch",
        "handler.service.openai_service",
        "handler.web.plain_app",
    ):
        assert heavy not in loaded


def test_the_engine_package_still_exports_its_names_on_first_use():
    from handler import engine

    assert engine.EngineState.READY.value == "ready"
    assert engine.SamplingParams(max_tokens=1).max_tokens == 1
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        _ = engine.Nothing  # type: ignore[attr-defined]
