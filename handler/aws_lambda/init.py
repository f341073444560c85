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

from handler.config import ConfigError, Settings, load_settings
from handler.engine import EngineState, create_engine
from handler.telemetry import configure_logging

if TYPE_CHECKING:
    from handler.aws_lambda.app import LambdaApp

log = logging.getLogger("coldstart.lambda")


class InitError(RuntimeError):
    """Init cannot succeed; the message is the one line Lambda reports."""


def init(started: float, settings: Settings | None = None) -> LambdaApp:
    """Lambda init: start the load, build the app meanwhile, wait within INIT_BUDGET_S.

    `started` is the `time.perf_counter()` reading taken when init began.
    """
    try:
        settings = settings or load_settings()
    except ConfigError as exc:
        raise InitError(str(exc)) from None
    configure_logging(settings.log_level)
    engine = create_engine(settings)
    engine.start()  # the mmap load overlaps the imports and the app built below
    from handler.aws_lambda.app import LambdaApp

    lambda_app = LambdaApp(engine, settings)
    remaining = settings.init_budget_s - (time.perf_counter() - started)
    state = engine.wait_loaded(max(0.0, remaining))
    lambda_app.init_s = time.perf_counter() - started
    if state is EngineState.FAILED:
        raise InitError(engine.status().reason or "model failed to load")
    if state is EngineState.LOADING:
        log.warning(
            "model still loading after %.1fs; continuing in the background", settings.init_budget_s
        )
    log.info("init done in %.3fs, state=%s", time.perf_counter() - started, state.value)
    return lambda_app
