"""The one route table: every endpoint, once. The FastAPI app, the plain ASGI app that serves cold
invokes and the direct Lambda invokes are all built from `ROUTES`.

A route's handler takes the service and a `Call` (validated body, path parameters, deadline,
cancel event) and returns an OpenAI object (dict), a `ChunkStream` (sent as SSE) or a `Reply`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from threading import Event
from typing import Any

from pydantic import BaseModel

from handler.deadline import Deadline
from handler.errors import MethodNotAllowed, NotFound
from handler.service.chunk_stream import ChunkStream
from handler.service.health import Reply, liveness, prometheus, readiness
from handler.service.openai_service import OpenAIService
from handler.service.responses import ResponsesRequest, create_response, is_responses_payload
from handler.service.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from handler.service.shapes import CHAT, TEXT

Result = dict[str, Any] | ChunkStream | Reply


@dataclass(frozen=True)
class Call:
    """One request as every front door hands it to a route."""

    body: Any = None  # an instance of the route's schema
    path_params: dict[str, str] = field(default_factory=dict)
    deadline: Deadline = None
    cancel: Event | None = None


Handler = Callable[[OpenAIService, Call], Result]


@dataclass(frozen=True)
class Route:
    """One endpoint.

    `generates`: the handler may block on the model (front doors run it off the event loop, with
    a cancel event); others answer at once and never wait behind a generation.
    `direct_field`: a direct Lambda invoke whose payload has this field is a call of this route,
    if `direct_when` (for a field two routes share) also holds for the payload.
    """

    method: str
    path: str  # with {name} (one segment) or {name:path} (the rest) parameters
    name: str
    handle: Handler
    schema: type[BaseModel] | None = None
    authenticated: bool = True
    generates: bool = False
    direct_field: str | None = None
    direct_when: Callable[[dict[str, Any]], bool] | None = None

    def match(self, path: str) -> dict[str, str] | None:
        """The path parameters if `path` is this route's, else None."""
        found = _pattern(self.path).fullmatch(path)
        return found.groupdict() if found else None


def _chat(service: OpenAIService, call: Call) -> Result:
    req: ChatCompletionRequest = call.body
    if req.stream:
        return service.stream(CHAT, req, call.deadline)
    return service.complete(CHAT, req, call.deadline, call.cancel)


def _completion(service: OpenAIService, call: Call) -> Result:
    req: CompletionRequest = call.body
    if req.stream:
        return service.stream(TEXT, req, call.deadline)
    return service.complete(TEXT, req, call.deadline, call.cancel)


ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/chat/completions",
        "chat_completions",
        _chat,
        ChatCompletionRequest,
        generates=True,
        direct_field="messages",
    ),
    Route(
        "POST",
        "/v1/completions",
        "completions",
        _completion,
        CompletionRequest,
        generates=True,
        direct_field="prompt",
    ),
    Route(
        "POST",
        "/v1/responses",
        "responses",
        lambda s, c: create_response(s, c.body, c.deadline, c.cancel),
        ResponsesRequest,
        generates=True,
        # Before embeddings: both take `input`; a payload that is not embeddings' goes here.
        direct_field="input",
        direct_when=is_responses_payload,
    ),
    Route(
        "POST",
        "/v1/embeddings",
        "embeddings",
        lambda s, c: s.embeddings(c.body, c.deadline),
        EmbeddingRequest,
        generates=True,
        direct_field="input",
    ),
    Route("GET", "/v1/models", "list_models", lambda s, c: s.models()),
    Route(
        "GET",
        "/v1/models/{model_id:path}",
        "get_model",
        lambda s, c: s.model(c.path_params["model_id"]),
    ),
    Route("GET", "/healthz", "healthz", lambda s, c: liveness(s.engine), authenticated=False),
    Route("GET", "/readyz", "readyz", lambda s, c: readiness(s.engine), authenticated=False),
    Route(
        "GET",
        "/metrics",
        "metrics",
        lambda s, c: prometheus(s.engine, s.metrics),
        authenticated=False,
    ),
)


def resolve(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route of a request and its path parameters; 404 or 405 as OpenAI errors."""
    other_method = False
    for route in ROUTES:
        params = route.match(path)
        if params is None:
            continue
        if route.method == method:
            return route, params
        other_method = True
    if other_method:
        raise MethodNotAllowed(f"Method {method} not allowed on {path}")
    raise NotFound(f"Unknown route: {method} {path}")


def direct_route(payload: dict[str, Any]) -> Route | None:
    """The route a direct invoke's payload calls, by its distinguishing field."""
    for route in ROUTES:
        if route.direct_field is None or route.direct_field not in payload:
            continue
        if route.direct_when is None or route.direct_when(payload):
            return route
    return None


_PARAMETER = re.compile(r"\{(\w+)(:path)?\}")
_PATTERNS: dict[str, re.Pattern[str]] = {}


def _pattern(template: str) -> re.Pattern[str]:
    """`/a/{x}/{y:path}` as a regex: one segment for {x}, the rest of the path for {y:path}."""
    compiled = _PATTERNS.get(template)
    if compiled is None:
        parts, last = [], 0
        for m in _PARAMETER.finditer(template):
            parts.append(re.escape(template[last : m.start()]))
            parts.append(f"(?P<{m.group(1)}>{'.+' if m.group(2) else '[^/]+'})")
            last = m.end()
        parts.append(re.escape(template[last:]))
        compiled = _PATTERNS[template] = re.compile("".join(parts))
    return compiled
