"""Picks the engine that INFERENCE_ENGINE names; both serve the same surface to the service."""

from __future__ import annotations

from typing import TYPE_CHECKING

from handler.config import Settings
from handler.engine import Engine

if TYPE_CHECKING:
    from handler.slot_engine import SlotEngine


def create_engine(settings: Settings) -> Engine | SlotEngine:
    """`llama`: llama.cpp in this process; `llama-server`: llama.cpp's server as a child."""
    if settings.inference_engine == "llama-server":
        # Imported only here: the default engine's init path never pays for http.client.
        from handler.slot_engine import SlotEngine

        return SlotEngine(settings)
    return Engine(settings)
