"""Telemetry: CloudWatch Embedded Metric Format lines on Lambda, Prometheus text in server mode,
and the logging setup.

Written here rather than with aws-lambda-powertools' Metrics: its import costs 16 ms after
pydantic (40 ms alone) on this machine kind, paid on every cold start, for a JSON line we can
write in a few lines. Both outputs come from one `Metrics` object, so a picture drawn from the
EMF lines shows what production would.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

NAMESPACE = "coldstart"

# name -> (CloudWatch unit, Prometheus help)
METRICS: dict[str, tuple[str, str]] = {
    "ColdStart": ("Count", "1 on the first invocation of an execution environment"),
    "Restore": ("Count", "1 on the first invocation after a SnapStart restore"),
    "RestoreDuration": ("Seconds", "the after-restore hook: reseed, recheck the engine"),
    "InitDuration": ("Seconds", "init phase: process start to handler ready"),
    "ResolveDuration": ("Seconds", "model source resolution (download for S3)"),
    "ImportDuration": ("Seconds", "import of llama.cpp bindings"),
    "LoadDuration": ("Seconds", "model mmap load"),
    "WarmupDuration": ("Seconds", "warm-up evaluation"),
    "QueueDuration": ("Seconds", "time a request waited for the engine"),
    "TimeToFirstToken": ("Seconds", "prompt evaluation to first token"),
    "TokensPerSecond": ("Count/Second", "decode speed of the last generation"),
    "CompletionTokens": ("Count", "tokens generated"),
    "PromptTokens": ("Count", "prompt tokens evaluated"),
    "QueueDepth": ("Count", "requests waiting for the engine"),
    "InvocationDuration": ("Seconds", "time spent in the handler for one invocation"),
    "ResponseCacheHit": ("Count", "1 when a deterministic request was answered from the cache"),
}


@dataclass
class Metrics:
    """Collects per-invocation values (for EMF) and running totals (for Prometheus)."""

    function_name: str = "coldstart"
    _pending: dict[str, float] = field(default_factory=dict)
    _last: dict[str, float] = field(default_factory=dict)
    _totals: dict[str, float] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, name: str, value: float | None) -> None:
        """Record one observation (ignored when `value` is None)."""
        if value is None:
            return
        if name not in METRICS:
            raise KeyError(f"unknown metric {name}")
        with self._lock:
            self._pending[name] = self._pending.get(name, 0.0) + value
            self._last[name] = value
            self._totals[name] = self._totals.get(name, 0.0) + value
            self._counts[name] = self._counts.get(name, 0) + 1

    def record_many(self, values: Mapping[str, float | None]) -> None:
        """Record several observations."""
        for name, value in values.items():
            self.record(name, value)

    def emf_line(self, dimensions: Mapping[str, str] | None = None) -> str | None:
        """One EMF JSON line with what was recorded since the last call, or None if nothing."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return None
        dims = {"FunctionName": self.function_name, **(dimensions or {})}
        document: dict[str, Any] = {
            "_aws": {
                "Timestamp": int(time.time() * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": NAMESPACE,
                        "Dimensions": [sorted(dims)],
                        "Metrics": [{"Name": n, "Unit": METRICS[n][0]} for n in sorted(pending)],
                    }
                ],
            },
            **dims,
            **pending,
        }
        return json.dumps(document, separators=(",", ":"))

    def flush_emf(self, stream: IO[str] | None = None, **dimensions: str) -> None:
        """Write the EMF line to stdout (CloudWatch Logs picks it up) if there is one."""
        line = self.emf_line(dimensions)
        if line is not None:
            out = stream or sys.stdout
            out.write(line + "\n")
            out.flush()

    def prometheus_text(self, gauges: Mapping[str, float] | None = None) -> str:
        """Prometheus exposition: a counter and sum per metric, last values, and gauges."""
        lines: list[str] = []
        with self._lock:
            totals, counts, last = dict(self._totals), dict(self._counts), dict(self._last)
        for name in sorted(totals):
            metric = f"coldstart_{_snake(name)}"
            lines += [
                f"# HELP {metric} {METRICS[name][1]} ({METRICS[name][0]})",
                f"# TYPE {metric} summary",
                f"{metric}_sum {totals[name]:.6g}",
                f"{metric}_count {counts[name]}",
                f"# TYPE {metric}_last gauge",
                f"{metric}_last {last[name]:.6g}",
            ]
        for name, value in sorted((gauges or {}).items()):
            metric = f"coldstart_{name}"
            lines += [f"# TYPE {metric} gauge", f"{metric} {value:.6g}"]
        return "\n".join(lines) + "\n"


def configure_logging(level: str) -> None:
    """Our loggers at `level`; reuse the runtime's root handler when there is one."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("coldstart").setLevel(level.upper())


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
