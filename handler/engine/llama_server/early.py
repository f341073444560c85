"""The llama-server child, spawned at the first instant of the process, before the engine exists.

The child's start (exec, its libraries, CUDA, the model read and upload) is the longest part of
a cold start, and none of it needs anything from our process but its command line. Importing the
engine, the model sources, the prefetch and the web stack first cost about 0.2 s from a cold
disk before the spawn (bench/RESULTS.md, "The child spawned first"), so the command line starts
it from here, with only the settings and the process module imported, and the engine takes it
over (`take`) once it has resolved the model itself: the checks of the file (header, size) run
then, and a file that fails them stops the child and fails the engine as before.

Only for a model on a local path (baked into the image, EFS, a volume): an s3:// model must be
downloaded first, and a pinned hash (MODEL_VERIFY_HASH with MODEL_SHA256) must be checked before
anything reads the file as a model. Once per process, like the early prefetch.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Mapping

from handler.config import ConfigError, Settings, load_settings
from handler.engine.llama_server.process import LlamaServer
from handler.environment import path_of_uri
from handler.telemetry import configure_logging

log = logging.getLogger("coldstart.llama_server")

_EARLY: list[LlamaServer] = []


def spawn(environ: Mapping[str, str], *, under_awslambdaric: bool = False) -> LlamaServer | None:
    """The child for the settings `environ` gives, spawned now; None where the engine must
    start it itself (another engine, a bad setting, a remote or unchecked model, no binary).

    `under_awslambdaric`: `python -m handler lambda`, which runs awslambdaric unless the settings
    pick our loop; awslambdaric sets up its own logging, so its engine starts the child."""
    if _EARLY:
        return _EARLY[0]
    try:
        settings = load_settings(environ)
    except ConfigError:
        return None  # the entry point reports it right after
    path = local_model_path(settings)
    if settings.inference_engine != "llama-server" or path is None:
        return None
    if under_awslambdaric and settings.lambda_runtime != "coldstart":
        return None
    # Our log lines from here on, in the format the entry point would set up anyway.
    configure_logging(settings.logging_level, settings.aws_lambda_log_format)
    server = LlamaServer(settings, path)
    try:
        server.spawn()
    except Exception:
        log.exception("llama-server could not be started early; the engine will try again")
        return None
    atexit.register(server.stop)  # in case no engine ever takes it over
    _EARLY.append(server)
    return server


def local_model_path(settings: Settings) -> str | None:
    """The model's path as the engine will resolve it, or None unless it may be read now."""
    if settings.model_verify_hash and settings.model_sha256:
        return None
    path = path_of_uri(settings.model_uri)  # None: s3:// (or a scheme the engine rejects)
    return str(path) if path is not None and path.is_file() else None


def take(settings: Settings, model_path: str) -> LlamaServer | None:
    """The early child if it runs the command line these give, else None (and it is stopped)."""
    if not _EARLY:
        return None
    server = _EARLY.pop()
    if server.runs(settings, model_path):
        log.info("llama-server was started early (pid %s)", server.pid)
        return server
    server.stop()
    return None
