"""Runs a route for every ASGI front door: auth, body, deadline, then the handler, off the event
loop when it may wait on the model, with a cancel event a hung-up client sets.

Generating routes run on a thread pool of this dispatcher's own, sized by admission control
(MAX_CONCURRENCY + MAX_QUEUE, plus room to answer 429s), so the routes that must answer at
once (health, readiness, metrics, models) never wait behind generations on a shared pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from handler.config import Settings
from handler.service.openai_service import OpenAIService
from handler.web.http import check_api_key, parse_body, scope_deadline
from handler.web.routes import Call, Result, Route

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

# Threads beyond admission's capacity: enough to turn the next requests away with 429 at once.
REJECTION_THREADS = 4


class Dispatcher:
    """Runs routes on behalf of one app."""

    def __init__(self, service: OpenAIService, settings: Settings, watch_disconnect: bool) -> None:
        self.service = service
        self.settings = settings
        self.watch_disconnect = watch_disconnect
        capacity = settings.max_concurrency + settings.max_queue + REJECTION_THREADS
        self._pool = ThreadPoolExecutor(capacity, thread_name_prefix="coldstart-request")

    def authenticate(self, route: Route, authorization: str | None) -> None:
        """401 unless the route is open or the bearer token matches API_KEY."""
        if route.authenticated:
            check_api_key(self.settings, authorization)

    def call(
        self, route: Route, scope: Any, params: dict[str, str], body: bytes | None = None
    ) -> Call:
        """The route's call: its body validated (400 otherwise), the request's deadline."""
        parsed = parse_body(route.schema, body or b"") if route.schema is not None else None
        return Call(parsed, params, scope_deadline(scope, self.settings))

    async def run(self, route: Route, call: Call, receive: Receive | None) -> Result:
        """The handler's result; a generating route runs off the loop and, with
        `watch_disconnect`, stops when the client hangs up (`receive` reports it)."""
        if not route.generates:
            return route.handle(self.service, call)
        loop = asyncio.get_running_loop()
        if not self.watch_disconnect or receive is None:
            return await loop.run_in_executor(self._pool, route.handle, self.service, call)
        cancel = threading.Event()
        watcher = asyncio.ensure_future(_set_on_disconnect(receive, cancel))
        try:
            call = dataclasses.replace(call, cancel=cancel)
            return await loop.run_in_executor(self._pool, route.handle, self.service, call)
        finally:
            watcher.cancel()


async def _set_on_disconnect(receive: Receive, cancel: threading.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel.set()
