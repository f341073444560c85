"""All configuration, read once from the environment into one typed `Settings`.

Its environment comes from `handler.environment`, the one place that reads `os.environ`.
Every field is documented in README.md; the
environment variable is the field name in upper case (e.g. `model_uri` <- `MODEL_URI`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from handler.environment import DEFAULT_MODEL_PATH, current

__all__ = [
    "DEFAULT_MODEL_PATH",
    "ConfigError",
    "Settings",
    "available_cpus",
    "load_settings",
    "runtime_api_address",
]


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


class Settings(BaseModel):
    """Runtime settings; each field is an environment variable of the same name, upper-cased.

    A plain pydantic model: `load_settings` is the one reader of the environment (pydantic-settings
    cost 50-70 ms of imports before the model load could start, for a lookup done here anyway).
    """

    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())

    # Model source
    model_uri: str = Field(DEFAULT_MODEL_PATH, description="Path, file:// URI or s3://bucket/key")
    model_sha256: str | None = Field(None, description="Expected sha256 of the model file")
    model_verify_hash: bool = Field(False, description="Hash local/EFS models at init (slow)")
    model_cache_dir: Path = Field(Path("/tmp/models"), description="Where S3 models are cached")
    model_alias: str | None = Field(None, description="Model id served by /v1/models")
    model_size_bytes: int | None = Field(None, ge=1, description="Expected size (cheap check)")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint override (tests, MinIO)")
    s3_part_size_mb: int = Field(16, ge=5, le=512, description="Ranged GET part size")
    s3_concurrency: int = Field(16, ge=1, le=64, description="Concurrent ranged GETs")
    s3_max_attempts: int = Field(5, ge=1, le=20, description="Retries per request")

    # Prefetch: read a local model into memory at the storage's speed from the start of init
    prefetch: Literal["auto", "off"] = Field(
        "auto", description="auto: local models not already in the page cache are read ahead"
    )
    prefetch_readers: int = Field(16, ge=1, le=256, description="parallel reads in flight")
    prefetch_reserve_mb: int = Field(
        512, ge=0, description="memory left free by the prefetch (KV cache, buffers, Python)"
    )

    # Engine
    warmup: Literal["lazy", "init", "off"] = "lazy"
    init_budget_s: float = Field(8.0, gt=0, le=10)
    n_ctx: int = Field(2048, ge=64, le=1_048_576)
    n_batch: int = Field(512, ge=1)
    n_threads: int = Field(default_factory=available_cpus, ge=1, le=512)
    n_gpu_layers: int = Field(0, ge=-1)
    max_tokens_cap: int = Field(4096, ge=1)
    prompt_cache_mb: int = Field(128, ge=0, description="KV states of long prompts kept; 0 = off")
    prompt_cache_min_tokens: int = Field(256, ge=1, description="shortest prompt worth keeping")
    response_cache_entries: int = Field(0, ge=0, description="answers kept for temperature 0")
    response_cache_mb: int = Field(16, ge=1, description="bound on the response cache")
    deadline_margin_ms: int = Field(500, ge=0)

    # Which engine generates (docs/gpu.md): `llama` runs llama.cpp in this process, one generation
    # at a time; `llama-server` runs llama.cpp's server as a child process with PARALLEL_SLOTS
    # slots whose decode steps are batched together (continuous batching, for GPUs).
    inference_engine: Literal["llama", "llama-server"] = "llama"
    llama_server_bin: str = Field("llama-server", description="Path, or a name on PATH")
    parallel_slots: int = Field(8, ge=1, le=1024, description="llama-server slots (-np)")
    llama_server_args: str = Field("", description="Extra llama-server flags, shell-quoted")

    # API
    api_key: SecretStr | None = None
    max_request_bytes: int = Field(1_048_576, ge=1024)
    max_messages: int = Field(256, ge=1)
    max_choices: int = Field(8, ge=1, le=128, description="the largest `n` a request may ask")
    context_overflow: Literal["error", "truncate"] = Field(
        "error", description="truncate: drop the oldest non-system messages until the chat fits"
    )
    max_concurrency: int = Field(1, ge=1, le=1024, description="generations run at once")
    max_queue: int = Field(8, ge=0, le=100_000, description="requests that may wait; then 429")

    # Server mode
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Lambda runtime: which Runtime API client runs the function (docs/runtime.md)
    runtime: Literal["auto", "awslambdaric", "coldstart"] = Field(
        "auto", description="auto: our loop when streaming or concurrent, else awslambdaric"
    )
    invoke_mode: Literal["BUFFERED", "RESPONSE_STREAM"] = Field(
        "BUFFERED", description="The function URL's InvokeMode; RESPONSE_STREAM streams HTTP"
    )

    # Set by Lambda itself
    aws_lambda_function_name: str = "coldstart"
    aws_lambda_function_version: str = "$LATEST"
    aws_lambda_function_memory_size: int | None = Field(None, ge=1)
    aws_lambda_runtime_api: str | None = Field(None, description="host:port of the Runtime API")
    aws_lambda_max_concurrency: int = Field(1, ge=1, le=1024, description="Managed Instances")
    aws_lambda_initialization_type: str = Field(
        "on-demand", description="on-demand, provisioned-concurrency or snap-start"
    )
    # From the function's LoggingConfig (LogFormat, ApplicationLogLevel)
    aws_lambda_log_format: Literal["Text", "JSON"] = Field(
        "Text", description="JSON: every log line one JSON object with the request id"
    )
    aws_lambda_log_level: Literal["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"] | None = (
        Field(None, description="ApplicationLogLevel; when set, it replaces LOG_LEVEL")
    )

    @model_validator(mode="before")
    @classmethod
    def _slots_run_at_once(cls, data: Any) -> Any:
        # With llama-server every slot generates at once: admit as many as there are slots.
        if (
            isinstance(data, dict)
            and data.get("inference_engine") == "llama-server"
            and "max_concurrency" not in data
        ):
            return {**data, "max_concurrency": data.get("parallel_slots", 8)}
        return data

    @field_validator("model_sha256")
    @classmethod
    def _sha256_hex(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be 64 hex characters")
        return value

    @field_validator("model_uri")
    @classmethod
    def _uri_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("invoke_mode", mode="before")
    @classmethod
    def _invoke_mode_upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("aws_lambda_log_format", mode="before")
    @classmethod
    def _log_format(cls, value: Any) -> Any:
        # As awslambdaric reads it: JSON in any case, anything else is text.
        if isinstance(value, str):
            return "JSON" if value.strip().upper() == "JSON" else "Text"
        return value

    @field_validator("aws_lambda_log_level", mode="before")
    @classmethod
    def _log_level_upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

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


def runtime_api_address(environ: Mapping[str, str] | None = None) -> str | None:
    """AWS_LAMBDA_RUNTIME_API alone, to report an init error when the rest of the config is bad."""
    return current(environ).get("AWS_LAMBDA_RUNTIME_API") or None


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from `environ` (default: the process environment), one clear error if bad."""
    env = current(environ)
    fields = Settings.model_fields
    # Only pass our own variables so unrelated environment never influences parsing.
    values = {
        name: env[name.upper()]
        for name in fields
        if name.upper() in env and env[name.upper()] != ""
    }
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]).upper() if first["loc"] else "settings"
        got = values.get(name.lower(), "")
        shown = "<secret>" if name == "API_KEY" else repr(got)
        raise ConfigError(f"invalid {name}={shown}: {first['msg']}") from None
