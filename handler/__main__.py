"""Command line: `python -m handler serve` runs the same app as an HTTP server (uvicorn)."""

from __future__ import annotations

import argparse
import sys

from handler.config import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it."""
    parser = argparse.ArgumentParser(prog="python -m handler")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the OpenAI API over HTTP")
    serve.add_argument("--host", help="listen address (default: HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: PORT or 8000)")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"coldstart: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve_http(settings, args.host or settings.host, args.port or settings.port)
    return 2  # pragma: no cover - argparse rejects unknown commands


def serve_http(settings: object, host: str, port: int) -> int:
    """Start the engine load and serve the app; readiness answers 503 until the model is in."""
    import uvicorn

    from handler.api import create_app
    from handler.config import Settings
    from handler.engine import Engine
    from handler.lambda_app import configure_logging

    assert isinstance(settings, Settings)
    configure_logging(settings.log_level)
    engine = Engine(settings)
    engine.start()
    app = create_app(engine, settings)
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
