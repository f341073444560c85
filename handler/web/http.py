"""HTTP pieces every front door shares, free of any web framework: auth, validation errors,
SSE framing, JSON rendering and the deadline of a request."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from handler import deadline as deadlines
from handler.config import Settings
from handler.errors import APIError, AuthenticationFailed, InternalError, InvalidRequest
from handler.service.chunk_stream import WAIT
from handler.service.responses_output import ResponseEvents

ModelT = TypeVar("ModelT", bound=BaseModel)

log = logging.getLogger("coldstart.api")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def check_api_key(settings: Settings, authorization: str | None) -> None:
    """Raise 401 unless API_KEY is unset or the bearer token matches (constant-time compare)."""
    if settings.api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    expected = settings.api_key.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise AuthenticationFailed("Incorrect or missing API key (Authorization: Bearer ...)")


def invalid_request(errors: Sequence[Any]) -> InvalidRequest:
    """The first pydantic/FastAPI validation problem as a 400 naming the parameter."""
    if not errors:
        return InvalidRequest("invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return InvalidRequest("request body is not valid JSON", code="invalid_json")
    if first.get("type") == "missing" and not loc:
        return InvalidRequest("request body is required")
    if first.get("type") in ("model_type", "model_attributes_type", "dict_type") and not loc:
        return InvalidRequest("request body must be a JSON object")
    param = ".".join(loc) if loc else None
    message = first.get("msg", "invalid value")
    return InvalidRequest(f"{param}: {message}" if param else message, param=param)


def parse_body(schema: type[ModelT], body: bytes | dict[str, Any]) -> ModelT:
    """A request body (raw JSON, or an already decoded event payload) validated by `schema`;
    a 400 naming the first bad parameter otherwise."""
    if not isinstance(body, bytes):
        return _validated(schema, body)
    try:
        return schema.model_validate_json(body or b"null")
    except ValidationError as exc:
        errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        decoded = _json_as_fastapi_reads_it(body)
        if decoded is not _UNREADABLE:
            return _validated(schema, decoded)
    raise invalid_request(errors)


def _validated(schema: type[ModelT], value: Any) -> ModelT:
    try:
        return schema.model_validate(value)
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None


_UNREADABLE = object()


def _json_as_fastapi_reads_it(body: bytes) -> Any:
    """A body pydantic's JSON parser refused, decoded by `json.loads` as the FastAPI app decodes
    it, or `_UNREADABLE`. They differ on unpaired surrogate escapes (`"\\ud800"`), which only
    `json.loads` accepts: validating what it reads names the field at fault, as the FastAPI app
    does, instead of calling the whole body invalid JSON."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _UNREADABLE


def render_json(content: Any) -> bytes:
    """JSON bytes exactly as Starlette's JSONResponse renders them, so every door answers the
    same bytes; text that is not UTF-8 (an unpaired surrogate from an event's path, echoed in an
    error message) is written as a `\\u` escape instead of failing the response."""
    options: dict[str, Any] = {"allow_nan": False, "separators": (",", ":")}
    try:
        return json.dumps(content, ensure_ascii=False, **options).encode()
    except UnicodeEncodeError:
        return json.dumps(content, ensure_ascii=True, **options).encode()


# The line a listened-to stream gives when it has nothing new yet (`ChunkStream.listen`): a
# reader that listens waits for its callback; no line is ever empty otherwise.
WAIT_LINE = ""


def sse_lines(chunks: Iterator[dict[str, Any]]) -> Iterator[str]:
    """Server-sent events: one `data:` line per chunk, an error object if one fails, then [DONE].
    A streamed response of the Responses API has its own framing (`named_events`)."""
    if isinstance(chunks, ResponseEvents):
        yield from named_events(chunks)
        return
    try:
        for chunk in chunks:
            if chunk is WAIT:
                yield WAIT_LINE
                continue
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    except Exception:
        log.exception("stream failed after the first chunk")
        yield f"data: {json.dumps(InternalError('generation failed').body())}\n\n"
    yield "data: [DONE]\n\n"


def named_events(events: Iterator[dict[str, Any]]) -> Iterator[str]:
    """Named server-sent events (the Responses API): `event: <type>` then its `data:` line; if
    one fails, an `error` event with the next sequence number. No [DONE]: the last event ends it."""
    sequence = 0
    try:
        for event in events:
            if event is WAIT:
                yield WAIT_LINE
                continue
            sequence = event["sequence_number"] + 1
            yield f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"
    except APIError as exc:
        yield _error_event(exc, sequence)
    except Exception:
        log.exception("stream failed after the first event")
        yield _error_event(InternalError("generation failed"), sequence)


def _error_event(error: APIError, sequence: int) -> str:
    event = {
        "type": "error",
        "code": error.code,
        "message": error.message,
        "param": error.param,
        "sequence_number": sequence,
    }
    return f"event: error\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


def scope_deadline(scope: Any, settings: Settings) -> deadlines.Deadline:
    """Lambda's remaining time (via Mangum's `aws.context`) minus the margin, else no deadline."""
    return deadlines.from_context(scope.get("aws.context"), settings.deadline_margin_ms)
