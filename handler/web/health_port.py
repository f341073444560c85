"""HEALTH_PORT: the health responder (`handler.web.health_responder`) started beside
`python -m handler serve`, and the posts on its probe board that keep it truthful.

The serving loop calls `post` at every wake-up of its lag timer; every CHECK_EVERY posts it also
looks whether the responder is still there, and logs an error once if it is not (its probes then
fail, and an orchestrator restarts the container, as it should). `stop` ends it with the server;
it also ends on its own once this process is gone.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable

from handler.web.probe_board import ProbeBoard

log = logging.getLogger("coldstart.api")

CHECK_EVERY = 50  # posts: once a second at the loop timer's 20 ms
STOP_GRACE_S = 2.0


class HealthPort:
    """The responder process on `host`:`port` and the board it reads."""

    def __init__(self, host: str, port: int, stale_s: float) -> None:
        self.board = ProbeBoard.create()
        command = [
            sys.executable,
            *("-m", "handler.web.health_responder"),
            *("--host", host, "--port", str(port)),
            *("--board-fd", str(self.board.fd), "--parent", str(os.getpid())),
            *("--stale-s", str(stale_s)),
        ]
        try:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, pass_fds=(self.board.fd,)
            )
        except BaseException:
            self.board.close()
            raise
        self._posts = 0
        self._gone_logged = False
        log.info("health responder on %s:%d (pid %d)", host, port, self.process.pid)

    def poster(self, state: Callable[[], str], in_flight: Callable[[], int]) -> Callable[[], None]:
        """What the loop's timer calls at each wake-up: posts `state()` and `in_flight()`."""

        def post() -> None:
            self.board.post(state(), in_flight())
            self._posts += 1
            if self._posts % CHECK_EVERY == 0:
                self._check()

        return post

    def _check(self) -> None:
        code = self.process.poll()
        if code is not None and not self._gone_logged:
            self._gone_logged = True
            log.error("the health responder exited with code %d: HEALTH_PORT probes fail", code)

    def stop(self) -> None:
        """End the responder and release the board."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.board.close()
