"""All configuration, read once from the environment into one typed `Settings`.

Its environment comes from `handler.environment`, the one place that reads `os.environ`.
Every field is documented in README.md; the
environment variable is the field name in upper case (e.g. `model_uri` <- `MODEL_URI`).

Plain dataclasses, no pydantic: this module is imported before the model load can start on
every cold start, and pydantic's import cost 0.23-0.34 s here (0.4 s from a cold disk) for ~50
environment variables; each field's type, bounds and choices are checked by `_parse` below.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from handler.environment import DEFAULT_MODEL_PATH, current

__all__ = [
    "DEFAULT_MODEL_PATH",
    "ConfigError",
    "Secret",
    "Settings",
    "available_cpus",
    "load_settings",
    "runtime_api_address",
]


S3_CACHE_DIR = Path("/tmp/models")

# Lambda's ApplicationLogLevel values -> Python's level names (TRACE has none: DEBUG).
LAMBDA_LOG_LEVELS = {
    "TRACE": "DEBUG",
    "DEBUG": "DEBUG",
    "INFO": "INFO",
    "WARN": "WARNING",
    "ERROR": "ERROR",
    "FATAL": "CRITICAL",
}


class ConfigError(ValueError):
    """Invalid configuration; the message is one line naming the variable."""


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process can really use: the affinity mask, capped by a cgroup CPU quota.

    Lambda gives 1-6 vCPUs depending on memory; containers (ECS/EKS) often show every host CPU
    but cap CPU time with a quota. More llama.cpp threads than that only makes them wait on
    each other at every barrier.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs' worth of quota from cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`, None if unlimited."""
    try:
        fields = (root / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu/cpu.cfs_quota_us").read_text())
        period = int((root / "cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


class Secret:
    """A value never shown: its repr and str are masked (API_KEY)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        """The value itself."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def setting(
    default: Any = MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    factory: Callable[[], Any] | None = None,
    description: str = "",
) -> Any:
    """One environment variable's default, bounds and description (the field's type is its
    annotation)."""
    metadata = {"ge": ge, "gt": gt, "le": le, "description": description}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Runtime settings; each field is an environment variable of the same name, upper-cased.

    `load_settings` is the one reader of the environment; `set_by_environment` names the fields
    the environment set (the rest are defaults).
    """

    # Model source
    model_uri: str = setting(DEFAULT_MODEL_PATH, description="Path, file:// URI or s3://bucket/key")
    model_sha256: str | None = setting(None, description="Expected sha256 of the model file")
    model_verify_hash: bool = setting(False, description="Hash local/EFS models at init (slow)")
    model_cache_dir: Path = setting(S3_CACHE_DIR, description="Where S3 models are cached")
    model_alias: str | None = setting(None, description="Model id served by /v1/models")
    model_size_bytes: int | None = setting(None, ge=1, description="Expected size (cheap check)")
    s3_endpoint_url: str | None = setting(None, description="S3 endpoint override (tests, MinIO)")
    s3_part_size_mb: int = setting(16, ge=5, le=512, description="Ranged GET part size")
    s3_concurrency: int = setting(16, ge=1, le=64, description="Concurrent ranged GETs")
    s3_max_attempts: int = setting(5, ge=1, le=20, description="Retries per request")

    # Prefetch: read a local model into memory at the storage's speed from the start of init
    prefetch: Literal["auto", "off"] = setting(
        "auto", description="auto: local models not already in the page cache are read ahead"
    )
    prefetch_readers: int = setting(16, ge=1, le=256, description="parallel reads in flight")
    prefetch_reserve_mb: int = setting(
        512, ge=0, description="memory left free by the prefetch (KV cache, buffers, Python)"
    )

    # Engine
    warmup: Literal["lazy", "init", "off"] = "lazy"
    init_budget_s: float = setting(8.0, gt=0, le=10)
    n_ctx: int = setting(2048, ge=64, le=1_048_576)
    n_batch: int = setting(512, ge=1)
    n_threads: int = setting(factory=available_cpus, ge=1, le=512)
    n_gpu_layers: int = setting(0, ge=-1)
    max_tokens_cap: int = setting(4096, ge=1)
    prompt_cache_mb: int = setting(128, ge=0, description="KV states of long prompts kept; 0 = off")
    prompt_cache_min_tokens: int = setting(256, ge=1, description="shortest prompt worth keeping")
    response_cache_entries: int = setting(0, ge=0, description="answers kept for temperature 0")
    response_cache_mb: int = setting(16, ge=1, description="bound on the response cache")
    deadline_margin_ms: int = setting(500, ge=0)

    # Which engine generates (docs/gpu.md): `llama` runs llama.cpp in this process, one generation
    # at a time; `llama-server` runs llama.cpp's server as a child process with PARALLEL_SLOTS
    # slots whose decode steps are batched together (continuous batching, for GPUs).
    inference_engine: Literal["llama", "llama-server"] = "llama"
    llama_server_bin: str = setting("llama-server", description="Path, or a name on PATH")
    parallel_slots: int = setting(8, ge=1, le=1024, description="llama-server slots (-np)")
    llama_server_args: str = setting("", description="Extra llama-server flags, shell-quoted")
    # Sampling on the device that computed the logits (llama.cpp's backend sampling): the slot's
    # chain runs in the graph and one token id comes back instead of the vocabulary's logits.
    backend_sampling: Literal["auto", "on", "off"] = setting(
        "auto", description="auto: with GPU layers, while 32 or more generations are in flight"
    )
    # A buffered request whose client can hang up (`serve`): `cancel` streams it from the child,
    # which drops the task at its next token once the client is gone; `finish` asks for one
    # answer (llama-server notices no hang-up under load, but skips its per-token hand-over);
    # `auto`, with GPU layers, asks for one answer while at most half the slots are busy, and
    # cancels otherwise (on the CPU, always).
    buffered_hangup: Literal["auto", "cancel", "finish"] = setting(
        "auto",
        description="auto: with GPU layers, one answer while half the slots are free; cancel: "
        "always streamed from the child; finish: always one answer (a hung-up request runs on)",
    )

    # API
    api_key: Secret | None = None
    max_request_bytes: int = setting(1_048_576, ge=1024)
    max_messages: int = setting(256, ge=1)
    max_choices: int = setting(8, ge=1, le=128, description="the largest `n` a request may ask")
    context_overflow: Literal["error", "truncate"] = setting(
        "error", description="truncate: drop the oldest non-system messages until the chat fits"
    )
    # Default: 1, or PARALLEL_SLOTS with llama-server (every slot generates at once).
    max_concurrency: int = setting(1, ge=1, le=1024, description="generations run at once")
    max_queue: int = setting(8, ge=0, le=100_000, description="requests that may wait; then 429")

    # Server mode
    host: str = "127.0.0.1"
    port: int = setting(8000, ge=1, le=65535)
    health_port: int | None = setting(
        None,
        ge=1,
        le=65535,
        description="/healthz and /readyz from a process of their own, never behind requests",
    )
    health_stale_s: float = setting(
        2.0, gt=0, description="HEALTH_PORT: liveness fails once the loop is stuck this long"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Lambda runtime: which Runtime API client runs the function (docs/runtime.md)
    runtime: Literal["auto", "awslambdaric", "coldstart"] = setting(
        "auto", description="auto: our loop when streaming or concurrent, else awslambdaric"
    )
    invoke_mode: Literal["BUFFERED", "RESPONSE_STREAM"] = setting(
        "BUFFERED", description="The function URL's InvokeMode; RESPONSE_STREAM streams HTTP"
    )

    # Set by Lambda itself
    aws_lambda_function_name: str = "coldstart"
    aws_lambda_function_version: str = "$LATEST"
    aws_lambda_function_memory_size: int | None = setting(None, ge=1)
    aws_lambda_runtime_api: str | None = setting(None, description="host:port of the Runtime API")
    aws_lambda_max_concurrency: int = setting(1, ge=1, le=1024, description="Managed Instances")
    aws_lambda_initialization_type: str = setting(
        "on-demand", description="on-demand, provisioned-concurrency or snap-start"
    )
    # From the function's LoggingConfig (LogFormat, ApplicationLogLevel)
    aws_lambda_log_format: Literal["Text", "JSON"] = setting(
        "Text", description="JSON: every log line one JSON object with the request id"
    )
    aws_lambda_log_level: Literal["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"] | None = (
        setting(None, description="ApplicationLogLevel; when set, it replaces LOG_LEVEL")
    )

    set_by_environment: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def variables(cls) -> tuple[str, ...]:
        """The environment variables Settings reads, upper-cased field names."""
        return tuple(name.upper() for name in _SPECS)

    @property
    def lambda_runtime(self) -> Literal["awslambdaric", "coldstart"]:
        """The runtime `python -m handler lambda` runs: ours where awslambdaric falls short."""
        if self.runtime != "auto":
            return self.runtime
        streaming = self.invoke_mode == "RESPONSE_STREAM"
        return "coldstart" if streaming or self.aws_lambda_max_concurrency > 1 else "awslambdaric"

    @property
    def logging_level(self) -> str:
        """The level of our loggers: Lambda's application log level when set, else LOG_LEVEL."""
        if self.aws_lambda_log_level is None:
            return self.log_level.upper()
        return LAMBDA_LOG_LEVELS[self.aws_lambda_log_level]

    @property
    def model_id(self) -> str:
        """The model name callers see; the file's stem unless MODEL_ALIAS is set."""
        if self.model_alias:
            return self.model_alias
        name = self.model_uri.rstrip("/").rsplit("/", 1)[-1]
        return name.removesuffix(".gguf") or "model"


# How a variable's text is normalised before its type is checked (pydantic's "before" step).
_NORMALISE: dict[str, Callable[[str], str]] = {
    "model_uri": str.strip,
    "model_sha256": lambda value: value.strip().lower(),
    "invoke_mode": lambda value: value.strip().upper(),
    # As awslambdaric reads it: JSON in any case, anything else is text.
    "aws_lambda_log_format": lambda value: "JSON" if value.strip().upper() == "JSON" else "Text",
    "aws_lambda_log_level": lambda value: value.strip().upper(),
}

_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


@dataclass(frozen=True)
class _Spec:
    """A field's parsed type: the base type (None allowed or not: an empty variable is a
    default either way), its Literal choices, its bounds."""

    kind: Any
    choices: tuple[str, ...]
    ge: float | None
    gt: float | None
    le: float | None


def _build_specs() -> dict[str, _Spec]:
    """Every environment field's spec, from the annotations."""
    specs: dict[str, _Spec] = {}
    hints = get_type_hints(Settings)
    for item in fields(Settings):
        if item.name == "set_by_environment":
            continue
        kind = hints[item.name]
        arguments = get_args(kind)
        if type(None) in arguments:
            (kind,) = (a for a in arguments if a is not type(None))
        choices: tuple[str, ...] = ()
        if get_origin(kind) is Literal:
            choices, kind = get_args(kind), Literal
        meta = item.metadata
        specs[item.name] = _Spec(kind, choices, meta.get("ge"), meta.get("gt"), meta.get("le"))
    return specs


# Built once at import, never mutated after: threads may share it.
_SPECS = _build_specs()


def _boolean(text: str) -> bool:
    word = text.strip().lower()
    if word not in _TRUE | _FALSE:
        raise ValueError("must be a boolean (true/false, 1/0, yes/no, on/off)")
    return word in _TRUE


def _integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("must be an integer") from None


def _number(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _text(text: str) -> str:
    return text


_CONVERTERS: dict[Any, Callable[[str], Any]] = {
    bool: _boolean,
    int: _integer,
    float: _number,
    Path: Path,
    Secret: Secret,
    str: _text,
}


def _sha256_hex(value: str) -> None:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("must be 64 hex characters")


def _not_empty(value: str) -> None:
    if not value:
        raise ValueError("must not be empty")


# Checks of one field beyond its type and bounds.
_CHECKS: dict[str, Callable[[Any], None]] = {"model_uri": _not_empty, "model_sha256": _sha256_hex}


def _parse(name: str, spec: _Spec, text: str) -> Any:
    """One variable's value, typed and checked; ValueError with the reason."""
    normalise = _NORMALISE.get(name)
    if normalise is not None:
        text = normalise(text)
    if spec.kind is Literal:
        if text not in spec.choices:
            raise ValueError("must be one of " + ", ".join(repr(c) for c in spec.choices))
        return text
    value = _CONVERTERS[spec.kind](text)
    check = _CHECKS.get(name)
    if check is not None:
        check(value)
    if spec.ge is not None and not value >= spec.ge:
        raise ValueError(f"must be greater than or equal to {spec.ge:g}")
    if spec.gt is not None and not value > spec.gt:
        raise ValueError(f"must be greater than {spec.gt:g}")
    if spec.le is not None and not value <= spec.le:
        raise ValueError(f"must be less than or equal to {spec.le:g}")
    return value


def runtime_api_address(environ: Mapping[str, str] | None = None) -> str | None:
    """AWS_LAMBDA_RUNTIME_API alone, to report an init error when the rest of the config is bad."""
    return current(environ).get("AWS_LAMBDA_RUNTIME_API") or None


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from `environ` (default: the process environment), one clear error if bad."""
    env = current(environ)
    values: dict[str, Any] = {}
    # Only our own variables are read, so unrelated environment never influences parsing.
    for name, spec in _SPECS.items():
        text = env.get(name.upper(), "")
        if text == "":
            continue
        try:
            values[name] = _parse(name, spec, text)
        except ValueError as exc:
            shown = "<secret>" if name == "api_key" else repr(text)
            raise ConfigError(f"invalid {name.upper()}={shown}: {exc}") from None
    given = frozenset(values)
    if values.get("inference_engine") == "llama-server":
        values.update(_llama_server_defaults(values))
    return Settings(**values, set_by_environment=given)


# llama-server's CPU threads with every layer on the GPU: they only feed the device and poll, and
# at 16 they took the cores our process relays tokens on (bench/RESULTS.md, "P6 GPU, fourth pass").
GPU_OFFLOADED_THREADS = 4


def _llama_server_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """Defaults that depend on other settings, for the variables left unset."""
    defaults: dict[str, Any] = {}
    if "max_concurrency" not in values:
        # With llama-server every slot generates at once: admit as many as there are slots.
        defaults["max_concurrency"] = values.get("parallel_slots", 8)
        if not 1 <= defaults["max_concurrency"] <= 1024:
            raise ConfigError(f"invalid PARALLEL_SLOTS: {defaults['max_concurrency']} slots")
    if "n_threads" not in values and values.get("n_gpu_layers") == -1:
        defaults["n_threads"] = min(GPU_OFFLOADED_THREADS, available_cpus())
    return defaults
