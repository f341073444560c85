"""Our Lambda Runtime API loop: response streaming and concurrent invocations on one model.

awslambdaric posts one buffered response per invocation and serves one invocation per process, so a
function URL in RESPONSE_STREAM mode gets no tokens until the end, and Lambda Managed Instances
(`AWS_LAMBDA_MAX_CONCURRENCY` > 1) would need one process, and one copy of the model, per request.
This loop speaks the Runtime API itself (`handler.aws_lambda.runtime_api`):

- every worker loops on `GET /runtime/invocation/next`; `AWS_LAMBDA_MAX_CONCURRENCY` workers
  (threads) share one `LambdaApp` and so one engine; each invocation has its own deadline
  (`Lambda-Runtime-Deadline-Ms`) and its own error: a crash is posted to `/{id}/error` and the
  worker goes on;
- `INVOKE_MODE=RESPONSE_STREAM`: function URL and API Gateway events run the ASGI app and stream
  its response as it is produced (`LambdaApp.stream`); every other event, and every event in
  BUFFERED mode, is answered by `LambdaApp.invoke` as one JSON body, exactly as under awslambdaric;
- an init failure is posted to `/runtime/init/error` with one line, and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from handler.aws_lambda.events import EventKind, classify
from handler.aws_lambda.runtime_api import (
    ErrorReport,
    Invocation,
    InvocationContext,
    RuntimeAPIError,
    RuntimeClient,
    report_init_error,
)
from handler.telemetry import invocation_scope

if TYPE_CHECKING:
    from handler.aws_lambda.app import LambdaApp
    from handler.config import Settings

log = logging.getLogger("coldstart.runtime")

STREAMING_KINDS = frozenset({EventKind.FUNCTION_URL, EventKind.API_GATEWAY_V1})
# The error types awslambdaric reports for failed SnapStart hooks.
BEFORE_SNAPSHOT_ERROR = "Runtime.BeforeSnapshotError"
AFTER_RESTORE_ERROR = "Runtime.AfterRestoreError"


class RuntimeLoop:
    """Serves invocations from the Runtime API with one `LambdaApp`, on one or more workers."""

    def __init__(self, lambda_app: LambdaApp, settings: Settings, address: str) -> None:
        self.lambda_app = lambda_app
        self.settings = settings
        self.address = address
        self.streaming = settings.invoke_mode == "RESPONSE_STREAM"

    def serve(self, workers: int = 1) -> None:
        """Run `workers` loops on `/next`; return when every one has lost the Runtime API."""
        threads = [
            threading.Thread(target=self.work, name=f"coldstart-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in threads:
            thread.start()
        log.info("runtime loop: %d worker(s), invoke mode %s", workers, self.settings.invoke_mode)
        for thread in threads:
            thread.join()

    def work(self) -> None:
        """One worker: next event, answer it, repeat, on this thread's own event loop."""
        client = RuntimeClient(self.address)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # Mangum runs the app on the thread's current loop
        try:
            while True:
                try:
                    invocation = client.next_invocation()
                except (RuntimeAPIError, OSError, http.client.HTTPException) as exc:
                    log.error("runtime API unavailable, worker stops: %s", exc)
                    return
                try:
                    self.handle(client, invocation, loop)
                except Exception:  # a bug of ours must not take the worker down
                    log.exception("request_id=%s: unexpected failure", invocation.request_id)
        finally:
            loop.close()

    def handle(
        self, client: RuntimeClient, invocation: Invocation, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Answer one invocation; any failure becomes this invocation's error, never the loop's."""
        # Every line logged while it is answered carries its request id (JSON logs).
        with invocation_scope(invocation.request_id):
            self._handle(client, invocation, loop)

    def _handle(
        self, client: RuntimeClient, invocation: Invocation, loop: asyncio.AbstractEventLoop
    ) -> None:
        started = time.perf_counter()
        context = InvocationContext(invocation, self.settings)
        mode = "buffered"
        try:
            try:
                event = json.loads(invocation.payload)
            except ValueError:
                client.post_error(
                    invocation.request_id, ErrorReport("Runtime.InvalidEvent", "event is not JSON")
                )
                return
            if self.streaming and classify(event) in STREAMING_KINDS:
                mode = "stream"
                self._stream(client, invocation, event, context, loop)
            else:
                self._buffered(client, invocation, event, context)
        except (RuntimeAPIError, OSError, http.client.HTTPException) as exc:
            log.error("request_id=%s could not be answered: %s", invocation.request_id, exc)
        finally:
            log.info(
                "request_id=%s mode=%s duration_ms=%.1f",
                invocation.request_id,
                mode,
                (time.perf_counter() - started) * 1000,
            )

    def _buffered(
        self, client: RuntimeClient, invocation: Invocation, event: Any, context: Any
    ) -> None:
        try:
            body = json.dumps(self.lambda_app.invoke(event, context)).encode()
        except Exception as exc:
            log.exception("request_id=%s failed", invocation.request_id)
            client.post_error(invocation.request_id, ErrorReport.from_exception(exc))
            return
        client.post_response(invocation.request_id, body)

    def _stream(
        self,
        client: RuntimeClient,
        invocation: Invocation,
        event: Any,
        context: Any,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        try:
            self.lambda_app.stream(
                event, context, lambda: client.open_stream(invocation.request_id), loop
            )
        except RuntimeAPIError:
            raise
        except Exception as exc:
            # stream() raises only while nothing was sent, so /error is still allowed.
            log.exception("request_id=%s failed before streaming", invocation.request_id)
            client.post_error(invocation.request_id, ErrorReport.from_exception(exc))


def main() -> int:
    """Init (config, model load within INIT_BUDGET_S), the SnapStart restore lifecycle when
    Lambda snapshots this environment, then serve until the Runtime API is gone."""
    started = time.perf_counter()
    from handler.environment import current
    from handler.model_source.prefetch import start_early

    prefetch = start_early(current())
    from handler.config import ConfigError, load_settings, runtime_api_address

    try:
        settings = load_settings()
    except ConfigError as exc:
        report_init_error(runtime_api_address(), str(exc))
        return 1
    address = settings.aws_lambda_runtime_api
    if not address:
        print("coldstart: AWS_LAMBDA_RUNTIME_API is not set (run under Lambda or the emulator)")
        return 2
    from handler.aws_lambda import snapstart
    from handler.aws_lambda.init import InitError, init
    from handler.signals import exit_on_sigterm

    try:
        lambda_app = init(started, settings, prefetch)
    except InitError as exc:
        report_init_error(address, str(exc))
        return 1
    except Exception as exc:
        log.exception("init failed")
        report_init_error(address, ErrorReport.from_exception(exc).message, type(exc).__name__)
        return 1
    if snapstart.snap_start(settings) and not snapshot_and_restore(lambda_app, address):
        return 1
    exit_on_sigterm()  # Lambda's shutdown: the engine (llama-server's child) is closed below
    try:
        RuntimeLoop(lambda_app, settings, address).serve(settings.aws_lambda_max_concurrency)
    finally:
        lambda_app.engine.close()
    return 1  # serve() returns only when the Runtime API is gone


def snapshot_and_restore(lambda_app: LambdaApp, address: str) -> bool:
    """SnapStart: before-snapshot hook, `/runtime/restore/next` (the snapshot is taken while it
    waits; it returns in a restored copy), after-restore hook; False after a reported failure."""
    from handler.aws_lambda import snapstart

    try:
        snapstart.before_freeze(lambda_app)
    except Exception as exc:
        log.exception("before-snapshot hook failed")
        report_init_error(address, ErrorReport.from_exception(exc).message, BEFORE_SNAPSHOT_ERROR)
        return False
    client = RuntimeClient(address)
    try:
        client.restore_next()
    except (RuntimeAPIError, OSError, http.client.HTTPException) as exc:
        log.error("runtime API unavailable at the snapshot: %s", exc)
        return False
    try:
        snapstart.after_restore(lambda_app)
    except Exception as exc:
        log.exception("after-restore hook failed")
        report = ErrorReport(AFTER_RESTORE_ERROR, ErrorReport.from_exception(exc).message)
        with contextlib.suppress(RuntimeAPIError, OSError, http.client.HTTPException):
            client.post_restore_error(report)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
