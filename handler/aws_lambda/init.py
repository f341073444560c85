"""Lambda init: the sequence that runs once per execution environment, at module import.

The model load starts first, on the engine thread, before anything heavy is imported: the web
stack (pydantic schemas, the plain ASGI app, Mangum) is imported and built while the mmap load
runs. Init then waits for the load only as long as INIT_BUDGET_S allows; a slower load continues
in the background and the first invoke waits for it within its own remaining time.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from handler.aws_lambda import snapstart
from handler.config import ConfigError, Settings, load_settings
from handler.engine import EngineState, create_engine
from handler.heap import freeze_after_load
from handler.model_source.prefetch import Prefetch, start_at_init
from handler.telemetry import configure_logging

if TYPE_CHECKING:
    from handler.aws_lambda.app import LambdaApp

log = logging.getLogger("coldstart.lambda")


class InitError(RuntimeError):
    """Init cannot succeed; the message is the one line Lambda reports."""


def init(
    started: float,
    settings: Settings | None = None,
    prefetch: Prefetch | None = None,
    awslambdaric_hooks: bool = False,
) -> LambdaApp:
    """Lambda init: start the load, build the app meanwhile, wait within INIT_BUDGET_S.

    `started` is the `time.perf_counter()` reading taken when init began; `prefetch` the model
    read-ahead the entry point started before Settings existed (else one starts here).
    An environment frozen after init (provisioned concurrency, SnapStart) is made ready to
    freeze: with SnapStart by the before-snapshot hook, which our Runtime API loop calls itself
    and awslambdaric calls when `awslambdaric_hooks` registered it.
    """
    try:
        settings = settings or load_settings()
    except ConfigError as exc:
        raise InitError(str(exc)) from None
    configure_logging(settings.logging_level, settings.aws_lambda_log_format)
    if prefetch is None:
        prefetch = start_at_init(settings)
    engine = create_engine(settings, prefetch)
    engine.start()  # the mmap load overlaps the imports and the app built below
    from handler.aws_lambda.app import LambdaApp

    lambda_app = LambdaApp(engine, settings)
    engine.app_built()  # the storage is free for the engine's read-ahead
    freeze_after_load(engine)  # the stack and the app out of the collector's full passes
    remaining = settings.init_budget_s - (time.perf_counter() - started)
    state = engine.wait_loaded(max(0.0, remaining))
    lambda_app.init_s = time.perf_counter() - started
    if state is EngineState.FAILED:
        raise InitError(engine.status().reason or "model failed to load")
    if state is EngineState.LOADING:
        log.warning(
            "model still loading after %.1fs; continuing in the background", settings.init_budget_s
        )
    if snapstart.snap_start(settings):
        if awslambdaric_hooks:
            snapstart.register_with_awslambdaric(lambda_app)
    elif snapstart.frozen_after_init(settings):
        freeze_ready(lambda_app)
    log.info("init done in %.3fs, state=%s", time.perf_counter() - started, state.value)
    return lambda_app


def freeze_ready(lambda_app: LambdaApp) -> None:
    """Make the environment ready to freeze, or fail init with the reason."""
    try:
        snapstart.before_freeze(lambda_app)
    except snapstart.FreezeError as exc:
        raise InitError(str(exc)) from None
