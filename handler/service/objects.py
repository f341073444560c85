"""Pieces of OpenAI response objects: ids, timestamps, usage, embeddings, model cards."""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    """Unix seconds for `created`."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """Floats as-is, or base64 of little-endian float32 as the official client expects."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def model_card(model_id: str, created: int) -> dict[str, Any]:
    """One entry of /v1/models."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "coldstart"}
