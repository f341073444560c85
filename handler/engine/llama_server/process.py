"""llama.cpp's `llama-server` as a child process: its command line, start, health and protocol.

The child listens on 127.0.0.1 only, on a port picked at start. Everything here speaks llama.cpp's
native endpoints (/health, /props, /tokenize, /completion with `stream`), not its OpenAI ones: our
own API stays the only OpenAI surface, and prompts travel as token ids.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from handler.config import Settings
from handler.engine.llama_server.upstream import BrokenAnswer, Connection
from handler.errors import ContextLengthExceeded, ModelNotReady
from handler.ports import free_port

log = logging.getLogger("coldstart.llama_server")

HOST = "127.0.0.1"
# /health answers 503 at once while the model loads: polling it often costs little, and the
# engine is ready at most this long after the child is.
HEALTH_POLL_S = 0.01
CALL_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
# Short calls (/tokenize, one per request; /props, the warm-up) reuse a kept-alive connection:
# a new one per call (its connect and close, the child's accept) was the largest part of our
# CPU time per request (bench/RESULTS.md, "Kept-alive short calls"). llama-server keeps an idle
# connection for 5 s and serves up to 100 requests on one; ours are dropped after KEEP_IDLE_S
# idle, and a call whose kept connection the child closed meanwhile is sent again on a new one
# (every short call is idempotent). At most KEEP_MAX are kept (an idle one holds an HTTP thread
# of the child's, which starts more when it runs short).
KEEP_IDLE_S = 4.0
KEEP_MAX = 16
# The child's log threshold (llama.cpp's own LLAMA_ARG_LOG_VERBOSITY) unless the environment
# sets one or LOG_LEVEL is debug: warnings and errors. At llama.cpp's default (3, info) the child
# writes about a dozen lines per request (the slot taken, its timings, the slot released, every
# HTTP request, /tokenize's included), and each is read, decoded and kept by our log thread,
# which then contends for the GIL with the event loop; we show them only at debug level anyway.
CHILD_LOG_VERBOSITY = "2"


class ServerError(RuntimeError):
    """llama-server could not start, or refused or broke a request."""


class AnswerBroken(ServerError):
    """The connection broke before the whole answer came (a cancel closes it on purpose)."""


def server_command(settings: Settings, model_path: str, port: int) -> list[str]:
    """The llama-server command line for these settings.

    Each slot gets N_CTX tokens of context (the KV cache is split, not shared); N_GPU_LAYERS=-1
    means every layer on the GPU; llama-server's own warm-up runs only with WARMUP=init.
    `--fit off`: llama-server's memory fit adjusts only what the command line leaves unset, and
    this one sets the layers and the context, so the fit could change nothing; it still costs a
    dry-run load of the model's metadata and vocabulary before the real load.
    """
    layers = "all" if settings.n_gpu_layers < 0 else str(settings.n_gpu_layers)
    command = [
        settings.llama_server_bin,
        "--model", model_path,
        "--host", HOST,
        "--port", str(port),
        "--parallel", str(settings.parallel_slots),
        "--ctx-size", str(settings.n_ctx * settings.parallel_slots),
        "--no-kv-unified",
        "--cont-batching",
        "--n-gpu-layers", layers,
        "--threads", str(settings.n_threads),
        "--batch-size", str(settings.n_batch),
        "--alias", settings.model_id,
        "--no-webui",
        "--fit", "off",
    ]  # fmt: skip
    if settings.warmup != "init":
        command.append("--no-warmup")
    return command + shlex.split(settings.llama_server_args)


class LlamaServer:
    """One llama-server process and the calls we make to it."""

    def __init__(self, settings: Settings, model_path: str) -> None:
        self.settings = settings
        self.model_path = model_path
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._kept: list[tuple[float, Connection]] = []  # (when kept, connection), newest last
        self._kept_lock = threading.Lock()

    def spawn(self) -> None:
        """Start the process (it loads the model on its own); `start` waits for it."""
        binary = shutil.which(self.settings.llama_server_bin)
        if binary is None:
            raise ServerError(f"LLAMA_SERVER_BIN {self.settings.llama_server_bin!r} not found")
        self.port = free_port()
        command = server_command(self.settings, self.model_path, self.port)
        command[0] = binary
        log.info("starting %s", shlex.join(command))
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_environment(self.settings),
        )
        threading.Thread(target=self._pump_log, name="coldstart-llama-log", daemon=True).start()

    def runs(self, settings: Settings, model_path: str) -> bool:
        """Whether this process was started with the command line `settings` and `model_path`
        give (the port aside) and is still running."""
        return (
            self._process is not None
            and self._process.poll() is None
            and server_command(settings, model_path, 0)
            == server_command(self.settings, self.model_path, 0)
        )

    def start(self, on_listening: Callable[[], None] | None = None) -> None:
        """Spawn the server unless `spawn` did, and wait until it answers /health (the model
        is loaded); `on_listening` runs once when it first answers at all (503 while it loads):
        its libraries and CUDA are up, and the model load begins."""
        if self._process is None:
            self.spawn()
        assert self._process is not None
        while (status := self._health()) != 200:
            if status is not None and on_listening is not None:
                on_listening()
                on_listening = None
            code = self._process.poll()
            if code is not None:
                raise ServerError(f"llama-server exited with code {code}: {self.last_error()}")
            time.sleep(HEALTH_POLL_S)
        if on_listening is not None:
            on_listening()

    @property
    def pid(self) -> int | None:
        """The process id, once spawned."""
        return None if self._process is None else self._process.pid

    def wait(self) -> int:
        """Block until the process exits; its exit code."""
        assert self._process is not None
        return self._process.wait()

    def exited(self) -> bool:
        """Whether the process has ended (or never started)."""
        return self._process is None or self._process.poll() is not None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        self.close_kept()
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def last_error(self) -> str:
        """The child's last line that mentions an error, else its last line."""
        lines = list(self._log_tail)
        errors = [line for line in lines if "error" in line.lower()]
        return (errors or lines or ["no output"])[-1]

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """A short JSON call (/props, /tokenize, a warm-up /completion), on a kept-alive
        connection when there is one."""
        payload = None if body is None else json.dumps(body).encode()
        conn = self._take_kept()
        kept = conn is not None
        while True:
            if conn is None:
                conn = self.connect(CALL_TIMEOUT_S)
            try:
                conn.request(method, path, payload)
                response = conn.response()
                data = response.read()
                break
            except OSError as exc:
                conn.close()
                if kept and isinstance(exc, ConnectionError):
                    conn, kept = None, False  # the child closed it while we kept it: anew
                    continue
                raise ServerError(f"llama-server {path}: {exc}") from None
        self._keep(conn, response.headers)
        if response.status != 200:
            raise server_error(response.status, data)
        result: dict[str, Any] = json.loads(data)
        return result

    def _take_kept(self) -> Connection | None:
        """The most recently kept connection still fresh enough; the stale ones are closed."""
        now = time.monotonic()
        with self._kept_lock:
            stale = [conn for at, conn in self._kept if now - at > KEEP_IDLE_S]
            fresh = [(at, conn) for at, conn in self._kept if now - at <= KEEP_IDLE_S]
            conn = fresh.pop()[1] if fresh else None
            self._kept = fresh
        for old in stale:
            old.close()
        return conn

    def _keep(self, conn: Connection, headers: dict[str, str]) -> None:
        """Keep `conn` for the next short call, unless the child is closing it or enough are."""
        if headers.get("connection", "").lower() != "close":
            with self._kept_lock:
                if len(self._kept) < KEEP_MAX:
                    self._kept.append((time.monotonic(), conn))
                    return
        conn.close()

    def close_kept(self) -> None:
        """Close every kept connection."""
        with self._kept_lock:
            kept, self._kept = self._kept, []
        for _, conn in kept:
            conn.close()

    def connect(self, timeout_s: float | None) -> Connection:
        """A connection to the child (connected by its request); closing it mid-answer cancels
        the task."""
        return Connection(HOST, self.port, timeout_s)

    def _health(self) -> int | None:
        """The status /health answers, None while nothing listens."""
        conn = self.connect(1.0)
        try:
            conn.request("GET", "/health")
            return conn.response().status
        except OSError:
            return None  # not listening yet
        finally:
            conn.close()

    def _pump_log(self) -> None:
        """Keep the child's last lines (for a failure reason); pass them on at debug level."""
        assert self._process is not None and self._process.stdout is not None
        for raw in self._process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._log_tail.append(line)
                log.debug("llama-server: %s", line)


def child_environment(
    settings: Settings, environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The child's environment: ours, with its log threshold (`CHILD_LOG_VERBOSITY`)."""
    env = dict(environ)
    if settings.logging_level != "DEBUG":
        env.setdefault("LLAMA_ARG_LOG_VERBOSITY", CHILD_LOG_VERBOSITY)
    return env


def send_completion(conn: Connection, body: dict[str, Any]) -> None:
    """POST /completion; its answer is read later (`read_events`, `read_answer`), on the thread
    that reads the generation, while the child already works on it."""
    try:
        conn.request("POST", "/completion", json.dumps(body).encode())
    except OSError as exc:
        raise ServerError(f"llama-server /completion: {exc}") from None


def read_events(conn: Connection) -> Iterator[dict[str, Any]]:
    """The JSON objects of a streamed /completion answer, one per sampled token."""
    response = conn.response()
    if response.status != 200:
        raise server_error(response.status, response.read())
    for line in response.lines():
        if (chunk := event_of(line)) is not None:
            yield chunk


def event_of(line: bytes) -> dict[str, Any] | None:
    """The JSON object of one line of a streamed /completion answer (None for a line that is
    not an event); an error event is raised as our error."""
    if not line.startswith(b"data: "):
        return None
    chunk: dict[str, Any] = json.loads(line[6:])
    if "error" in chunk:
        raise server_error(500, line[6:])
    return chunk


def read_answer(conn: Connection) -> dict[str, Any]:
    """A non-streamed /completion answer; AnswerBroken when the connection breaks first."""
    try:
        response = conn.response()
        data = response.read()
    except BrokenAnswer as exc:
        raise AnswerBroken(f"llama-server /completion: {exc}") from exc
    if response.status != 200:
        raise server_error(response.status, data)
    answer: dict[str, Any] = json.loads(data)
    return answer


def server_error(status: int, data: bytes) -> Exception:
    """Our error for a llama-server error answer."""
    try:
        error = json.loads(data).get("error", {})
    except (ValueError, AttributeError):
        error = {}
    message = error.get("message") if isinstance(error, dict) else None
    message = message or data.decode("utf-8", "replace")[:200] or f"HTTP {status}"
    if status == 503:
        return ModelNotReady(f"llama-server: {message}", retry_after_s=2)
    if isinstance(error, dict) and error.get("type") == "exceed_context_size_error":
        return ContextLengthExceeded(message, param="messages")
    return ServerError(f"llama-server answered {status}: {message}")
