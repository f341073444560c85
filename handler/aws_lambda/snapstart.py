"""Environments that are frozen after init: SnapStart snapshots and provisioned concurrency.

There Lambda runs init ahead of traffic, without the 10 s limit, then freezes the environment
(SnapStart snapshots the whole microVM when a version is published; restores are its cold
starts). So init is worth finishing: before the freeze the model is loaded, every weight page is
resident and the warm-up has run, and a restored copy answers its first request like a warm one.

After a restore, everything made at init is shared by every copy restored from the snapshot
(AWS: "Handling uniqueness with Lambda SnapStart"): the after-restore hook reseeds the RNG that
seedless sampling draws from, starts the cold-start metrics again (the next invoke reports a
restore), and lets the engine recheck what a new machine may change (CPU count, the child
server). Ids come from `uuid4`, i.e. the OS's CSPRNG, which a restore does not replay.

Both runtimes run the same two hooks: our Runtime API loop calls them around
`/runtime/restore/next`; awslambdaric calls what is registered with `snapshot_restore_py`.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING

from handler.config import Settings
from handler.engine import EngineState

if TYPE_CHECKING:
    from handler.aws_lambda.app import LambdaApp

log = logging.getLogger("coldstart.lambda")

SNAP_START = "snap-start"
PROVISIONED_CONCURRENCY = "provisioned-concurrency"


class FreezeError(RuntimeError):
    """The environment cannot be made ready to freeze; the message is one line."""


def snap_start(settings: Settings) -> bool:
    """Whether this init ends in a snapshot (AWS_LAMBDA_INITIALIZATION_TYPE=snap-start)."""
    return settings.aws_lambda_initialization_type == SNAP_START


def frozen_after_init(settings: Settings) -> bool:
    """Whether the environment is frozen after init (SnapStart or provisioned concurrency)."""
    return settings.aws_lambda_initialization_type in (SNAP_START, PROVISIONED_CONCURRENCY)


def before_freeze(app: LambdaApp) -> None:
    """Load, warm up and make the whole model resident; raise FreezeError if it cannot load."""
    started = time.perf_counter()
    engine = app.engine
    state = engine.wait_loaded(None)
    if state is EngineState.FAILED:
        raise FreezeError(engine.status().reason or "model failed to load")
    engine.warm_up()
    resident = engine.make_resident()
    app.full_app()  # the FastAPI app too: a restore should import nothing
    log.info(
        "ready to freeze in %.3fs: model warm, %d bytes resident",
        time.perf_counter() - started,
        resident,
    )


def after_restore(app: LambdaApp) -> None:
    """Make this restored copy unique and count its next invoke as a restore."""
    started = time.perf_counter()
    random.seed()  # from os.urandom: every copy samples differently
    app.engine.restored()
    app.restored(time.perf_counter() - started)
    log.info("restored in %.3fs", time.perf_counter() - started)


def register_with_awslambdaric(app: LambdaApp) -> None:
    """Hand both hooks to awslambdaric, which runs them around `/runtime/restore/next`."""
    from snapshot_restore_py import register_after_restore, register_before_snapshot

    register_before_snapshot(before_freeze, app)
    register_after_restore(after_restore, app)
