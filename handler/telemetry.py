"""Telemetry: CloudWatch Embedded Metric Format lines on Lambda, Prometheus text in server mode,
and the logging setup (text, or JSON objects with the request id when Lambda's log format is JSON).

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
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

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


class Histogram(Protocol):
    """A distribution kept elsewhere (the event loop's lag), shown by /metrics as it stands."""

    def snapshot(self) -> tuple[tuple[float, ...], list[int], float]:
        """(upper bounds, cumulative count per bound and then +Inf, sum of observations)."""
        ...


@dataclass
class Metrics:
    """Collects per-invocation values (for EMF) and running totals (for Prometheus)."""

    function_name: str = "coldstart"
    _pending: dict[str, float] = field(default_factory=dict)
    _last: dict[str, float] = field(default_factory=dict)
    _totals: dict[str, float] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _histograms: dict[str, tuple[str, Histogram]] = field(default_factory=dict)

    def watch(self, name: str, help_text: str, histogram: Histogram) -> None:
        """Show `histogram` in the Prometheus text as `coldstart_<name>`."""
        self._histograms[name] = (help_text, histogram)

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
        invocation = current_invocation()
        if invocation is not None:  # for the invocation's own log line (tokens)
            invocation.add(name, value)

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
        for name, (help_text, histogram) in sorted(self._histograms.items()):
            lines += _histogram_lines(f"coldstart_{name}", help_text, histogram)
        return "\n".join(lines) + "\n"


def _histogram_lines(metric: str, help_text: str, histogram: Histogram) -> list[str]:
    bounds, cumulative, total = histogram.snapshot()
    lines = [f"# HELP {metric} {help_text}", f"# TYPE {metric} histogram"]
    for bound, count in zip((*map(repr, bounds), "+Inf"), cumulative, strict=True):
        lines.append(f'{metric}_bucket{{le="{bound}"}} {count}')
    return [*lines, f"{metric}_sum {total:.6g}", f"{metric}_count {cumulative[-1]}"]


# ---------------------------------------------------------------- logging
#
# Two formats. Text (the default, `make run`): `time LEVEL logger message key=value ...`. JSON
# (Lambda's LogFormat JSON sets AWS_LAMBDA_LOG_FORMAT): one object per line with the keys
# awslambdaric writes in that mode (timestamp, level, message, logger, requestId, and errorType,
# errorMessage, stackTrace for an exception) and our fields (`log_fields`) as keys of their own.
# Under awslambdaric its own root handler and JSON formatter write the lines (and know the request
# id); under our Runtime API loop the handler below does, with the request id of the invocation
# each thread serves (`invocation_scope`).

# Every attribute a LogRecord has of its own; the rest came from `extra` (our fields).
# (awslambdaric's filter adds aws_request_id and tenant_id; its formatter _frame_type.)
_RUNTIME_ATTRIBUTES = ("message", "asctime", "aws_request_id", "tenant_id", "_frame_type")
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__).union(
    _RUNTIME_ATTRIBUTES
)


@dataclass
class Invocation:
    """One invocation being served: its request id and the metrics recorded while it ran."""

    request_id: str
    totals: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        """Count one recorded metric value towards this invocation."""
        self.totals[name] = self.totals.get(name, 0.0) + value


_CURRENT: ContextVar[Invocation | None] = ContextVar("coldstart_invocation", default=None)
_IN_FLIGHT: list[Invocation] = []
_IN_FLIGHT_LOCK = threading.Lock()
_LOG_FORMAT = {"json": False}  # set once by configure_logging


@contextmanager
def invocation_scope(request_id: str) -> Iterator[Invocation]:
    """Mark the current thread (and what it runs in its context) as serving `request_id`.

    Re-entering with the same id yields the invocation already in scope (the runtime loop and
    the app both enter it).
    """
    current = _CURRENT.get()
    if current is not None and current.request_id == request_id:
        yield current
        return
    invocation = Invocation(request_id)
    token = _CURRENT.set(invocation)
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.append(invocation)
    try:
        yield invocation
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.remove(invocation)
        _CURRENT.reset(token)


def current_invocation() -> Invocation | None:
    """The invocation this thread serves; on a thread no invocation started (the engine's, a
    request pool's) the one in flight when there is exactly one, else None."""
    invocation = _CURRENT.get()
    if invocation is not None:
        return invocation
    with _IN_FLIGHT_LOCK:
        return _IN_FLIGHT[0] if len(_IN_FLIGHT) == 1 else None


def log_fields(
    logger: logging.Logger, message: str, level: int = logging.INFO, **fields: Any
) -> None:
    """One log line with `fields`: keys of the JSON object in JSON mode, `key=value` text after
    the message otherwise. Fields are figures and states, never prompts, completions or keys."""
    if not logger.isEnabledFor(level):
        return
    if not _LOG_FORMAT["json"]:
        message = " ".join([message, *(f"{name}={value}" for name, value in fields.items())])
    logger.log(level, message, extra=fields)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record, keyed as awslambdaric's JSON formatter keys it."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "timestamp": _utc_timestamp(record),
            "level": record.levelname,
            "message": record.getMessage(),
            "logger": record.name,
        }
        request_id = getattr(record, "aws_request_id", None) or _current_request_id()
        if request_id:
            document["requestId"] = request_id
        if record.exc_info and record.exc_info[0] is not None:
            kind, error, trace = record.exc_info
            document["errorType"] = kind.__name__
            document["errorMessage"] = str(error)
            document["stackTrace"] = traceback.format_tb(trace)
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRIBUTES and name not in document:
                document[name] = value
        return json.dumps(document, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str = "Text") -> None:
    """Our loggers (`coldstart.*`) at `level`, lines in `log_format` (`Text` or `JSON`).

    Reuses the runtime's root handler when there is one (awslambdaric's, already in that
    format); otherwise installs one on stderr.
    """
    json_mode = log_format.upper() == "JSON"
    _LOG_FORMAT["json"] = json_mode
    if json_mode:
        logging.captureWarnings(True)  # a warning is a log line too, not raw text on stderr
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        formatter = (
            JsonLogFormatter()
            if json_mode
            else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
        )
        handler.setFormatter(formatter)
        root.addHandler(handler)
    logging.getLogger("coldstart").setLevel(level.upper())


def _current_request_id() -> str | None:
    invocation = current_invocation()
    return invocation.request_id if invocation is not None else None


def _utc_timestamp(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC with milliseconds, e.g. 2026-12-01T14:50:00.123Z."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
