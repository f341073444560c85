"""Shared fixtures: the real default model, settings, a loaded engine, servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from handler.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
EVENTS_DIR = ROOT / "events"
DEFAULT_MODEL = Path.home() / ".cache/coldstart/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def model_path() -> Path:
    """The real default model (fetched by `make model`)."""
    path = Path(os.environ.get("COLDSTART_TEST_MODEL", DEFAULT_MODEL))
    if not path.is_file():
        pytest.fail(f"default model missing at {path}: run `make model` (make test does)")
    return path


def load_event(name: str) -> dict[str, Any]:
    """An event from events/ (tests never inline events)."""
    return json.loads((EVENTS_DIR / name).read_text())


def make_settings(**overrides: Any) -> Settings:
    """Settings for the real model with `overrides` (as environment-style strings or values)."""
    env = {"MODEL_URI": str(model_path()), "N_CTX": "1024"}
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return load_settings(env)


def http_app(engine: Any, settings: Settings | None = None) -> Any:
    """The FastAPI app of the route table around `engine` (with its own settings by default)."""
    from handler.service.openai_service import OpenAIService
    from handler.web.fastapi_app import create_app

    return create_app(OpenAIService(engine, settings or engine.settings))


@pytest.fixture(scope="session")
def real_model() -> Path:
    return model_path()


@pytest.fixture(scope="session")
def engine(real_model: Path) -> Iterator[Any]:
    """One loaded engine on the real model, shared by the session (loading is the slow part)."""
    from handler.engine import EngineState
    from handler.engine.in_process.engine import InProcessEngine

    eng = InProcessEngine(make_settings())
    eng.start()
    assert eng.wait_loaded(60) in (EngineState.READY, EngineState.WARM)
    yield eng


class FakeContext:
    """The documented LambdaContext surface the handler reads."""

    def __init__(self, remaining_ms: int = 60_000, request_id: str = "test-request") -> None:
        import time

        self._deadline = time.monotonic() + remaining_ms / 1000
        self.aws_request_id = request_id
        self.function_name = "coldstart"
        self.memory_limit_in_mb = 3008
        self.invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:coldstart"

    def get_remaining_time_in_millis(self) -> int:
        import time

        return max(0, int((self._deadline - time.monotonic()) * 1000))
