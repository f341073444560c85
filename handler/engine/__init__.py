"""Engines: the contract the service depends on, the shared lifecycle, and the two engines.

`create_engine(settings)` picks the one INFERENCE_ENGINE names: `llama` runs llama.cpp in this
process (`in_process`), `llama-server` runs llama.cpp's server as a child (`llama_server`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from handler.config import Settings
    from handler.engine.contract import InferenceEngine
    from handler.engine.generation import Generation, GenerationResult, SamplingParams
    from handler.engine.lifecycle import LOADED_STATES, EngineState, EngineStatus, Phases
    from handler.model_source.prefetch import Prefetch

# Imported on first use, not with the package: `handler.engine.llama_server.early` spawns the
# child before the contract, the model sources and the prefetch are imported.
_EXPORTS = {
    "InferenceEngine": "handler.engine.contract",
    "Generation": "handler.engine.generation",
    "GenerationResult": "handler.engine.generation",
    "SamplingParams": "handler.engine.generation",
    "LOADED_STATES": "handler.engine.lifecycle",
    "EngineState": "handler.engine.lifecycle",
    "EngineStatus": "handler.engine.lifecycle",
    "Phases": "handler.engine.lifecycle",
}

__all__ = [
    "LOADED_STATES",
    "EngineState",
    "EngineStatus",
    "Generation",
    "GenerationResult",
    "InferenceEngine",
    "Phases",
    "SamplingParams",
    "create_engine",
]


def create_engine(settings: Settings, prefetch: Prefetch | None = None) -> InferenceEngine:
    """The engine INFERENCE_ENGINE names, not started yet; `prefetch` is the model's read-ahead
    if one is running (its progress shows in the engine's status)."""
    if settings.inference_engine == "llama-server":
        # Imported only here: the default engine's init path never pays for http.client.
        from handler.engine.llama_server.engine import LlamaServerEngine

        return LlamaServerEngine(settings, prefetch=prefetch)
    from handler.engine.in_process.engine import InProcessEngine

    return InProcessEngine(settings, prefetch=prefetch)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
