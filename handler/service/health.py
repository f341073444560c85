"""Liveness, readiness and Prometheus metrics: what operators and load balancers read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from handler.engine import LOADED_STATES, EngineState, InferenceEngine
from handler.telemetry import Metrics


@dataclass(frozen=True)
class Reply:
    """A response that is not an OpenAI object: status, JSON or text content, headers."""

    content: dict[str, Any] | str
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = "application/json"


def liveness(engine: InferenceEngine) -> Reply:
    """The process answers; never touches the model."""
    return Reply({"status": "ok", "state": engine.state.value})


def readiness(engine: InferenceEngine) -> Reply:
    """200 once the model is loaded, else 503 with Retry-After and the state."""
    status = engine.status()
    body = status.as_dict()
    if status.state in LOADED_STATES:
        return Reply(body)
    retry = "60" if status.reason else "1"
    return Reply(body, status=503, headers={"Retry-After": retry})


def prometheus(engine: InferenceEngine, metrics: Metrics) -> Reply:
    """Prometheus text: request metrics plus engine gauges."""
    status = engine.status()
    gauges = {
        "queue_depth": float(status.queue_depth),
        **{f"state_{s.value}": float(s is status.state) for s in EngineState},
        **{f"phase_{k}": v for k, v in status.phases.as_dict().items()},
    }
    return Reply(metrics.prometheus_text(gauges), media_type="text/plain; version=0.0.4")
