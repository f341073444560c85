"""Command line: `python -m handler serve` runs the same app as an HTTP server (uvicorn).

`python -m handler lambda` is the image's Lambda entry: it runs awslambdaric, or our own Runtime API
loop (`python -m handler runtime`) where streaming or concurrency need it (RUNTIME, INVOKE_MODE).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from handler.config import Settings


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it."""
    parser = argparse.ArgumentParser(prog="python -m handler")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the OpenAI API over HTTP")
    serve.add_argument("--host", help="listen address (default: HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: PORT or 8000)")
    commands.add_parser("lambda", help="run on Lambda: awslambdaric or our loop, per RUNTIME")
    commands.add_parser("runtime", help="our Lambda Runtime API loop (streaming, concurrency)")
    args = parser.parse_args(argv)
    if args.command in ("runtime", "lambda", "serve"):
        # Before anything heavy is imported: the weights stream in while Python imports the rest.
        from handler.environment import current

        environ = current()
        if environ.get("INFERENCE_ENGINE", "").strip() != "llama-server":
            from handler.model_source.prefetch import start_early

            start_early(environ)
        else:  # llama-server's child loads the model itself: it starts first
            from handler.engine.llama_server import early

            early.spawn(environ, under_awslambdaric=args.command == "lambda")
    from handler.config import ConfigError, load_settings

    if args.command == "runtime":
        from handler.aws_lambda.runtime_loop import main as runtime_main

        return runtime_main()
    if args.command == "lambda":
        return run_lambda()

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"coldstart: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        port = args.port or settings.port
        if settings.health_port == port:
            print(f"coldstart: HEALTH_PORT={port} is the API's own port", file=sys.stderr)
            return 2
        return serve_http(settings, args.host or settings.host, port)
    return 2  # pragma: no cover - argparse rejects unknown commands


def run_lambda() -> int:
    """Run the runtime that RUNTIME selects (auto: ours for RESPONSE_STREAM or concurrency > 1)."""
    from handler.aws_lambda.runtime_api import report_init_error
    from handler.aws_lambda.runtime_loop import main as runtime_main
    from handler.config import ConfigError, load_settings

    try:
        settings = load_settings()
    except ConfigError:
        return runtime_main()  # reports the config error through /runtime/init/error
    if settings.lambda_runtime == "coldstart":
        return runtime_main()
    if settings.invoke_mode == "RESPONSE_STREAM":
        report_init_error(
            settings.aws_lambda_runtime_api,
            "INVOKE_MODE=RESPONSE_STREAM needs RUNTIME=coldstart or auto (awslambdaric buffers)",
        )
        return 1
    from awslambdaric.__main__ import main as awslambdaric_main

    awslambdaric_main(["awslambdaric", "handler.lambda_function.handler"])
    return 0


def serve_http(settings: Settings, host: str, port: int) -> int:
    """Start the engine load, then import the web stack while it loads, and serve the app;
    readiness answers 503 until the model is in."""
    from handler.engine import create_engine
    from handler.environment import current
    from handler.heap import freeze_after_load
    from handler.model_source.prefetch import start_at_init, start_early
    from handler.signals import exit_on_sigterm
    from handler.telemetry import configure_logging

    configure_logging(settings.logging_level, settings.aws_lambda_log_format)
    early = start_early(current())  # the one `main` started, if it did
    engine = create_engine(settings, early if early is not None else start_at_init(settings))
    engine.start()  # the model (or llama-server's child) loads while the rest is imported
    import uvicorn

    from handler.service.openai_service import OpenAIService
    from handler.web.loop_lag import LoopLag
    from handler.web.plain_app import LazyFastAPI, PlainApp

    service = OpenAIService(engine, settings)
    health_port = None
    on_wake = None
    if settings.health_port is not None:
        from handler.web.health_port import HealthPort

        health_port = HealthPort(host, settings.health_port, settings.health_stale_s)
        admission = service.admission
        on_wake = health_port.poster(lambda: engine.state.value, lambda: admission.in_flight)
    fallback = LazyFastAPI(service, watch_disconnect=True)
    loop_lag = LoopLag(on_wake)
    app = PlainApp(service, settings, fallback=fallback, watch_disconnect=True, loop_lag=loop_lag)
    engine.app_built()  # the storage is free for the engine's read-ahead
    freeze_after_load(engine)  # the stack and the app out of the collector's full passes
    exit_on_sigterm()  # after uvicorn's graceful shutdown, the engine is closed below
    try:
        # uvloop and httptools: every streamed token is a socket write and a wakeup of this
        # loop (bench/RESULTS.md, "The relay's cost per token").
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=settings.log_level,
            access_log=False,
            loop="uvloop",
            http="httptools",
            lifespan="on",  # the plain app answers it: its loop timer starts with the server
        )
    finally:
        if health_port is not None:
            health_port.stop()
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
