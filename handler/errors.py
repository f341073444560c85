"""Errors as values: each carries the HTTP status and the OpenAI error fields it maps to."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error that becomes `{"error": {"message", "type", "param", "code"}}` with `status`."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers (Retry-After for overload and loading)."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(self.retry_after_s)}


class InvalidRequest(APIError):
    """Malformed or out-of-range input (400)."""


class ContextLengthExceeded(APIError):
    """The prompt plus requested tokens do not fit the context window (400)."""

    code = "context_length_exceeded"


class AuthenticationFailed(APIError):
    """Missing or wrong API key (401)."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(APIError):
    """Unknown route or model (404)."""

    status = 404
    code = "not_found"


class MethodNotAllowed(APIError):
    """Known route, wrong method (405)."""

    status = 405
    code = "method_not_allowed"


class PayloadTooLarge(APIError):
    """Request body over MAX_REQUEST_BYTES (413)."""

    status = 413
    code = "request_too_large"


class Overloaded(APIError):
    """Too many requests queued (429)."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"


class ModelNotReady(APIError):
    """The model is still loading or failed to load (503)."""

    status = 503
    type = "server_error"
    code = "model_not_ready"


class InternalError(APIError):
    """An unexpected failure, reported without leaking internals (500)."""

    status = 500
    type = "server_error"
    code = "internal_error"
