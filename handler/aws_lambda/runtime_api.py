"""The Lambda Runtime API (2018-06-01), client side, with http.client only: the next event,
buffered and streamed responses, invocation and init errors, the context of one invocation."""

from __future__ import annotations

import base64
import http.client
import json
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from handler.config import Settings

API = "/2018-06-01/runtime"
ERROR_CONTENT_TYPE = "application/vnd.aws.lambda.error+json"
HTTP_INTEGRATION_CONTENT_TYPE = "application/vnd.awslambda.http-integration-response"
ERROR_TYPE_TRAILER = "Lambda-Runtime-Function-Error-Type"
ERROR_BODY_TRAILER = "Lambda-Runtime-Function-Error-Body"


class RuntimeAPIError(RuntimeError):
    """The Runtime API refused a call or went away."""


@dataclass(frozen=True)
class ErrorReport:
    """A function error in Lambda's format (`errorType`, `errorMessage`)."""

    error_type: str
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorReport:
        """The exception's class and first line; the traceback goes to the log, not the caller."""
        lines = str(exc).strip().splitlines()
        return cls(type(exc).__name__, lines[0][:1000] if lines else type(exc).__name__)

    def body(self) -> bytes:
        """The JSON error document."""
        doc = {"errorMessage": self.message, "errorType": self.error_type, "stackTrace": []}
        return json.dumps(doc).encode()

    def header_type(self) -> str:
        """The error type, safe as a header or trailer value."""
        return "".join(c for c in self.error_type if c.isprintable())[:128] or "Unhandled"


@dataclass(frozen=True)
class Invocation:
    """One event from `/next`, with the headers Lambda sends along."""

    request_id: str
    deadline_ms: int | None
    function_arn: str
    trace_id: str | None
    client_context: str | None
    cognito_identity: str | None
    payload: bytes


class InvocationContext:
    """The LambdaContext surface our handlers read, for one invocation."""

    def __init__(self, invocation: Invocation, settings: Settings) -> None:
        self.aws_request_id = invocation.request_id
        self.invoked_function_arn = invocation.function_arn
        self.function_name = settings.aws_lambda_function_name
        self.function_version = settings.aws_lambda_function_version
        self.memory_limit_in_mb = settings.aws_lambda_function_memory_size
        self.trace_id = invocation.trace_id
        self.client_context = invocation.client_context
        self.identity = invocation.cognito_identity
        self._deadline_ms = invocation.deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before Lambda's deadline for this invocation."""
        if self._deadline_ms is None:
            return 900_000  # no deadline given: Lambda's longest timeout
        return max(0, self._deadline_ms - int(time.time() * 1000))


class RuntimeClient:
    """One keep-alive connection to the Runtime API; http.client is not thread-safe, so one each."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._conn = http.client.HTTPConnection(address)

    def next_invocation(self) -> Invocation:
        """Block until Lambda hands this worker an event."""
        try:
            status, body, headers = self._call("GET", f"{API}/invocation/next")
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # An idle keep-alive connection may have been closed; one fresh try.
            status, body, headers = self._call("GET", f"{API}/invocation/next")
        if status != 200:
            raise RuntimeAPIError(f"/next answered {status}: {body[:200]!r}")
        deadline = headers.get("Lambda-Runtime-Deadline-Ms")
        request_id = headers.get("Lambda-Runtime-Aws-Request-Id")
        if not request_id:
            raise RuntimeAPIError("/next answered without Lambda-Runtime-Aws-Request-Id")
        return Invocation(
            request_id=request_id,
            deadline_ms=int(deadline) if deadline and deadline.isdigit() else None,
            function_arn=headers.get("Lambda-Runtime-Invoked-Function-Arn", ""),
            trace_id=headers.get("Lambda-Runtime-Trace-Id"),
            client_context=headers.get("Lambda-Runtime-Client-Context"),
            cognito_identity=headers.get("Lambda-Runtime-Cognito-Identity"),
            payload=body,
        )

    def post_response(self, request_id: str, body: bytes) -> None:
        """A buffered response for `request_id`."""
        self._post(f"{API}/invocation/{request_id}/response", body, "application/json")

    def post_error(self, request_id: str, error: ErrorReport) -> None:
        """An invocation error (only before any byte of a streamed response)."""
        self._post(f"{API}/invocation/{request_id}/error", error.body(), ERROR_CONTENT_TYPE, error)

    def restore_next(self) -> None:
        """SnapStart: ask for the snapshot; returns once this environment has been restored."""
        status, body, _ = self._call("GET", f"{API}/restore/next")
        if status != 200:
            raise RuntimeAPIError(f"/restore/next answered {status}: {body[:200]!r}")

    def post_restore_error(self, error: ErrorReport) -> None:
        """The after-restore hook failed; Lambda discards this restored environment."""
        self._post(f"{API}/restore/error", error.body(), ERROR_CONTENT_TYPE, error)

    def post_init_error(self, error: ErrorReport) -> None:
        """Init failed; Lambda reports `error` and restarts the environment."""
        self._post(f"{API}/init/error", error.body(), ERROR_CONTENT_TYPE, error)

    def open_stream(self, request_id: str) -> ResponseStream:
        """Start a streamed response for `request_id` on a connection of its own."""
        return ResponseStream(self.address, request_id)

    def _post(
        self, path: str, body: bytes, content_type: str, error: ErrorReport | None = None
    ) -> None:
        headers = {"Content-Type": content_type}
        if error is not None:
            headers[ERROR_TYPE_TRAILER] = error.header_type()
        status, answer, _ = self._call("POST", path, body, headers)
        if not 200 <= status < 300:
            raise RuntimeAPIError(f"POST {path} answered {status}: {answer[:200]!r}")

    def _call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, http.client.HTTPMessage]:
        try:
            self._conn.request(method, path, body=body, headers=headers or {})
            response = self._conn.getresponse()
            return response.status, response.read(), response.headers
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self._conn.close()
            raise
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise RuntimeAPIError(f"{method} {path}: {exc}") from exc


class ResponseStream:
    """A streamed response: chunked POST with the streaming headers, error trailers at the end.

    The Runtime API takes `/error` only before the first byte; after it, an error travels in the
    `Lambda-Runtime-Function-Error-Type` and `-Body` (base64) trailers, declared up front.
    """

    def __init__(self, address: str, request_id: str) -> None:
        self.bytes_sent = 0
        self.first_byte_at: float | None = None
        self._conn = http.client.HTTPConnection(address)
        try:
            self._conn.putrequest(
                "POST", f"{API}/invocation/{request_id}/response", skip_accept_encoding=True
            )
            self._conn.putheader("Lambda-Runtime-Function-Response-Mode", "streaming")
            self._conn.putheader("Transfer-Encoding", "chunked")
            self._conn.putheader("Content-Type", HTTP_INTEGRATION_CONTENT_TYPE)
            self._conn.putheader("Trailer", f"{ERROR_TYPE_TRAILER}, {ERROR_BODY_TRAILER}")
            self._conn.endheaders()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise RuntimeAPIError(f"could not open the response stream: {exc}") from exc

    def write(self, data: bytes) -> None:
        """Send `data` as one chunk, now."""
        if not data:
            return  # a zero-length chunk would end the body
        try:
            self._conn.send(b"%X\r\n%b\r\n" % (len(data), data))
        except OSError as exc:
            self._conn.close()
            raise RuntimeAPIError(f"response stream broken: {exc}") from exc
        if self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()
        self.bytes_sent += len(data)

    def close(self, error: ErrorReport | None = None) -> None:
        """End the body, with the error trailers if `error`, and read the Runtime API's answer."""
        trailers = b""
        if error is not None:
            encoded = base64.b64encode(error.body()).decode()
            trailers = (
                f"{ERROR_TYPE_TRAILER}: {error.header_type()}\r\n"
                f"{ERROR_BODY_TRAILER}: {encoded}\r\n".encode()
            )
        try:
            self._conn.send(b"0\r\n" + trailers + b"\r\n")
            response = self._conn.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise RuntimeAPIError(f"response stream broken: {exc}") from exc
        finally:
            self._conn.close()  # the documented end of a streamed response
        if not 200 <= response.status < 300:
            raise RuntimeAPIError(f"streamed response answered {response.status}: {answer[:200]!r}")


def report_init_error(
    address: str | None, message: str, error_type: str = "Runtime.InitError"
) -> None:
    """Post `message` to `/runtime/init/error` (and print it, the line a person reads in logs)."""
    print(f"coldstart: init failed: {message}", file=sys.stderr, flush=True)
    if not address:
        return
    try:
        RuntimeClient(address).post_init_error(ErrorReport(error_type, message))
    except (RuntimeAPIError, OSError, http.client.HTTPException) as exc:
        print(f"coldstart: could not report the init error: {exc}", file=sys.stderr, flush=True)
