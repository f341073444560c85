"""What a load run sends and how it reads the answers: the events of events/load/, one `Outcome`
per request, and the two targets (our HTTP server, our function under the Lambda emulator),
started here or already running. bench/closed_loop.py drives them.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    MODEL,
    ROOT,
    emulator_command,
    free_port,
    invoke_url,
    poll,
    serve_command,
    spawn,
)

EVENTS_DIR = ROOT / "events/load"
DELIMITER = b"\0" * 8  # between the prelude and the body of a streamed Lambda response


@dataclass
class Outcome:
    """One request's result."""

    event: str
    size: str
    stream: bool
    latency_s: float
    kind: str = "ok"  # or an error kind: http_429:overloaded, timeout, lambda:Sandbox.Timedout
    ttft_s: float | None = None
    completion_tokens: int = 0


@dataclass(frozen=True)
class LoadEvent:
    """A function URL event from events/load/ and what the runner needs to know about it."""

    name: str
    size: str
    stream: bool
    event: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> LoadEvent:
        event = json.loads(path.read_text())
        body = json.loads(http_body(event))
        size = path.stem.split("-")[1] if path.stem.count("-") >= 2 else "unknown"
        return cls(path.name, size, bool(body.get("stream")), event)


def read_events(folder: Path) -> list[LoadEvent]:
    """Every event in `folder`, in file order; exits with a hint when there are none."""
    events = [LoadEvent.read(p) for p in sorted(folder.glob("*.json"))]
    if not events:
        raise SystemExit(f"no events in {folder}: run python -m bench.load_events")
    return events


def http_body(event: dict[str, Any]) -> bytes:
    """The request body of a function URL event."""
    body = event.get("body") or ""
    return base64.b64decode(body) if event.get("isBase64Encoded") else body.encode()


# ------------------------------------------------------------------ parsing answers


def error_kind(status: int, payload: bytes) -> str:
    """`http_<status>` plus the OpenAI error code when the body is an error object."""
    try:
        code = json.loads(payload)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return f"http_{status}:{code}" if code else f"http_{status}"


def json_outcome(outcome: Outcome, payload: bytes) -> Outcome:
    """Fill in a buffered answer's tokens."""
    outcome.completion_tokens = int(json.loads(payload).get("usage", {}).get("completion_tokens"))
    return outcome


def sse_outcome(outcome: Outcome, lines: Iterator[str], started: float) -> Outcome:
    """Read SSE lines: time to the first chunk with text, tokens from the usage chunk, and an
    error if a chunk carries one or [DONE] never comes."""
    done = False
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            outcome.kind = f"stream_error:{chunk['error'].get('code')}"
            return outcome
        if outcome.ttft_s is None and any(
            (c.get("delta") or {}).get("content") or c.get("text") for c in chunk["choices"]
        ):
            outcome.ttft_s = time.perf_counter() - started
        if chunk.get("usage"):
            outcome.completion_tokens = int(chunk["usage"]["completion_tokens"])
    if not done:
        outcome.kind = "stream_truncated"
    return outcome


# ------------------------------------------------------------------ targets


class ServerTarget:
    """Sends each event as the HTTP request it describes to `python -m handler serve`."""

    name = "server"
    ttft_observable = True

    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base_url = base_url
        self.client = httpx.Client(base_url=base_url, timeout=timeout_s)

    def send(self, item: LoadEvent) -> Outcome:
        event = item.event
        method = event["requestContext"]["http"]["method"]
        query = event.get("rawQueryString") or ""
        url = event["rawPath"] + (f"?{query}" if query else "")
        headers = {k: v for k, v in event["headers"].items() if k not in ("host", "content-length")}
        outcome = Outcome(item.name, item.size, item.stream, 0.0)
        started = time.perf_counter()
        request = self.client.build_request(method, url, headers=headers, content=http_body(event))
        response = self.client.send(request, stream=True)
        try:
            if response.status_code != 200:
                outcome.kind = error_kind(response.status_code, response.read())
            elif item.stream:
                sse_outcome(outcome, response.iter_lines(), started)
            else:
                json_outcome(outcome, response.read())
        finally:
            response.close()
        outcome.latency_s = time.perf_counter() - started
        return outcome


class EmulatorTarget:
    """Posts each event to the Lambda emulator's invocations URL, as Lambda would deliver it."""

    name = "emulator"
    ttft_observable = False

    def __init__(self, invoke_url: str, timeout_s: float) -> None:
        self.base_url = invoke_url
        self.client = httpx.Client(timeout=timeout_s)

    def send(self, item: LoadEvent) -> Outcome:
        outcome = Outcome(item.name, item.size, item.stream, 0.0)
        started = time.perf_counter()
        response = self.client.post(self.base_url, json=item.event)
        outcome.latency_s = time.perf_counter() - started
        raw = response.content
        if response.status_code != 200:
            return self._lambda_error(outcome, raw, f"rie_{response.status_code}")
        head, sep, body = raw.partition(DELIMITER)
        if sep:  # a streamed response: prelude, delimiter, body
            status = int(json.loads(head).get("statusCode", 200))
        else:
            result = json.loads(raw)
            if "errorType" in result or "statusCode" not in result:
                return self._lambda_error(outcome, raw, "lambda_error")
            status = int(result["statusCode"])
            body = result.get("body") or ""
            body = base64.b64decode(body) if result.get("isBase64Encoded") else body.encode()
        if status != 200:
            outcome.kind = error_kind(status, body)
        elif item.stream:
            sse_outcome(outcome, iter(body.decode().split("\n\n")), started)
            outcome.ttft_s = None  # the emulator hands the stream over whole
        else:
            json_outcome(outcome, body)
        return outcome

    @staticmethod
    def _lambda_error(outcome: Outcome, raw: bytes, fallback: str) -> Outcome:
        try:
            outcome.kind = f"lambda:{json.loads(raw)['errorType']}"
        except (ValueError, KeyError, TypeError):
            outcome.kind = fallback
        return outcome


Target = ServerTarget | EmulatorTarget


def send_safely(target: Target, item: LoadEvent) -> Outcome:
    """`target.send`, with transport failures and unreadable answers counted as error kinds."""
    started = time.perf_counter()
    try:
        return target.send(item)
    except httpx.TimeoutException:
        kind = "timeout"
    except httpx.TransportError as exc:
        kind = f"connection:{type(exc).__name__}"
    except (ValueError, KeyError, TypeError) as exc:
        kind = f"bad_answer:{type(exc).__name__}"
    return Outcome(item.name, item.size, item.stream, time.perf_counter() - started, kind)


# ------------------------------------------------------------------ starting a target


@contextmanager
def started_server(env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """`python -m handler serve` on a free port, ready; yields (base URL, pid)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with spawn(serve_command(port), target_env(env)) as proc:
        poll(lambda: _ready(f"{base}/readyz"), 120, 0.05, proc=proc, retry_on=_NOT_YET)
        yield base, proc.pid


@contextmanager
def started_emulator(
    env: dict[str, str], stream_mode: bool, timeout_s: float
) -> Iterator[tuple[str, int]]:
    """The real RIE running our function; yields (invocations URL, pid of the RIE).

    The function timeout is half the client's: the function then answers (cut short at its
    deadline) before the client gives up, and never gets a second invoke while one is running,
    which makes the RIE panic.
    """
    env = {"AWS_LAMBDA_FUNCTION_TIMEOUT": str(max(1, int(timeout_s / 2))), **env}
    port, api_port = free_port(), free_port()
    runtime = None  # awslambdaric, as in production
    if stream_mode:
        runtime = [sys.executable, "-m", "handler", "lambda"]
        env = {"INVOKE_MODE": "RESPONSE_STREAM", **env}
    with spawn(emulator_command(port, api_port, runtime), target_env(env)) as proc:
        poll(lambda: _ready(f"http://127.0.0.1:{port}/"), 60, 0.05, proc=proc, retry_on=_NOT_YET)
        yield invoke_url(port), proc.pid


def target_env(env: dict[str, str]) -> dict[str, str]:
    """The target's environment: the default model unless MODEL_URI is given."""
    return {"MODEL_URI": str(MODEL), **env}


_NOT_YET = (httpx.TransportError,)  # not listening yet


def _ready(url: str) -> bool:
    """True once `url` answers 200 (the emulator: anything); fail at once if the model failed to
    load."""
    response = httpx.get(url, timeout=1)
    if url.endswith("/readyz") and response.status_code != 200:
        if response.json().get("state") == "failed":
            raise RuntimeError(f"the model failed to load: {response.json().get('reason')}")
        return False
    return True
