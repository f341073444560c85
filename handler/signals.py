"""SIGTERM as a clean exit: ECS, Kubernetes and Lambda's shutdown stop a process with it.

Its default action ends the process on the spot: no `finally`, no atexit, so llama-server's child
outlived us (uvicorn re-raises the signal after its own graceful shutdown, with the handler it
found before it started). As SystemExit it unwinds the main thread: the entry point closes the
engine and the exit code is the shell's 128 + 15.
"""

from __future__ import annotations

import signal


def exit_on_sigterm() -> None:
    """From now on SIGTERM raises SystemExit(143) in the main thread."""
    signal.signal(signal.SIGTERM, _exit)


def _exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)
