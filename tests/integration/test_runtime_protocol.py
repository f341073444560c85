"""GIVEN our Runtime API loop on the real model, against a Runtime API server that implements the
documented protocol (concurrent /next, chunked streamed bodies with trailers, timestamped chunks)
WHEN function URL, direct and broken events arrive THEN responses stream as tokens are produced,
match the buffered answers, errors land where the protocol puts them, and invocations run at once.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from bench.runtime_api_server import Result, RuntimeAPIServer
from handler.aws_lambda.app import LambdaApp
from handler.aws_lambda.runtime_loop import RuntimeLoop
from tests.conftest import ROOT, load_event, make_settings, model_path

pytestmark = pytest.mark.integration

STREAM_EVENT = "function-url-chat-stream.json"


def url_event(stream: bool, max_tokens: int = 24, content: str | None = None) -> dict[str, Any]:
    """The function URL sample with its request body adjusted."""
    event = load_event(STREAM_EVENT)
    body = json.loads(event["body"])
    body.update(stream=stream, max_tokens=max_tokens, temperature=0)
    if not stream:
        body.pop("stream_options", None)
    if content is not None:
        body["messages"][-1]["content"] = content
    event["body"] = json.dumps(body)
    return event


class FailingApp(LambdaApp):
    """The real app, with faults injected around it (never inside the model)."""

    fail_at_message: int | None = None  # 0: the response start, 1: the first body message...

    async def asgi(self, scope: Any, receive: Any, send: Any) -> None:
        sent = 0

        async def counting_send(message: Any) -> None:
            nonlocal sent
            if sent == self.fail_at_message:
                raise RuntimeError("injected fault mid-stream")
            sent += 1
            await send(message)

        await super().asgi(scope, receive, counting_send)

    def invoke(self, event: Any, context: Any) -> Any:
        if isinstance(event, dict) and event.get("crash"):
            raise RuntimeError("injected crash in the handler")
        return super().invoke(event, context)


@pytest.fixture
def runtime(engine) -> Iterator[Any]:
    """Start a loop against a fresh Runtime API server: `start(workers, invoke_mode)`."""
    started: list[tuple[RuntimeAPIServer, threading.Thread]] = []

    def start(workers: int = 1, invoke_mode: str = "RESPONSE_STREAM"):
        settings = make_settings(INVOKE_MODE=invoke_mode, AWS_LAMBDA_MAX_CONCURRENCY=workers)
        server = RuntimeAPIServer().__enter__()
        lambda_app = FailingApp(engine, settings)
        loop = RuntimeLoop(lambda_app, settings, server.address)
        thread = threading.Thread(target=loop.serve, args=(workers,), daemon=True)
        thread.start()
        started.append((server, thread))
        return server, lambda_app

    yield start
    for server, thread in started:
        server.close()
        thread.join(60)
        assert not thread.is_alive(), "workers did not stop when the Runtime API went away"


def sse_events(body: bytes) -> list[str]:
    return [e[6:] for e in body.decode().split("\n\n") if e.startswith("data: ")]


def content_of(chunks: list[str]) -> str:
    text = ""
    for data in chunks:
        if data != "[DONE]":
            for choice in json.loads(data).get("choices", []):
                text += choice["delta"].get("content") or ""
    return text


def check_streaming_headers(result: Result) -> None:
    assert result.kind == "stream"
    assert result.headers["lambda-runtime-function-response-mode"] == "streaming"
    assert result.headers["transfer-encoding"] == "chunked"
    assert result.headers["content-type"] == "application/vnd.awslambda.http-integration-response"
    declared = {t.strip() for t in result.headers["trailer"].split(",")}
    assert declared == {"Lambda-Runtime-Function-Error-Type", "Lambda-Runtime-Function-Error-Body"}


def test_sse_chunks_arrive_while_the_model_generates(runtime):
    server, _ = runtime()
    result = server.result(server.invoke(url_event(stream=True, max_tokens=32)))

    check_streaming_headers(result)
    assert result.trailers == {}
    prelude, body = result.split_prelude()
    assert prelude["statusCode"] == 200
    assert prelude["headers"]["content-type"].startswith("text/event-stream")
    assert prelude["cookies"] == []
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    # Timestamps of the HTTP chunks: the first token's chunk came before the one that ended it.
    first = next(t for t, data in result.chunks if b'"delta":{"content":"' in data)
    last = next(t for t, data in result.chunks if b'"finish_reason":"' in data)
    assert first < last
    with_content = [d for _, d in result.chunks if b'"delta":{"content":"' in d]
    assert len(with_content) >= 2, "tokens should arrive as separate chunks"


def test_streamed_text_equals_the_buffered_answer(runtime):
    server, _ = runtime()
    streamed = server.result(server.invoke(url_event(stream=True, max_tokens=32)))
    buffered = server.result(server.invoke(url_event(stream=False, max_tokens=32)))

    _, stream_body = streamed.split_prelude()
    # A non-stream request through a RESPONSE_STREAM URL: same prelude, one JSON body.
    prelude, json_body = buffered.split_prelude()
    assert prelude["statusCode"] == 200
    answer = json.loads(json_body)["choices"][0]["message"]["content"]
    assert answer
    assert content_of(sse_events(stream_body)) == answer


def test_error_after_the_first_byte_travels_in_trailers(runtime):
    server, lambda_app = runtime()
    lambda_app.fail_at_message = 3  # after the start and two SSE events
    result = server.result(server.invoke(url_event(stream=True, max_tokens=32)))

    check_streaming_headers(result)
    _, body = result.split_prelude()
    assert len(sse_events(body)) == 2  # what was sent before the fault stays sent
    assert result.trailers["lambda-runtime-function-error-type"] == "RuntimeError"
    error = json.loads(base64.b64decode(result.trailers["lambda-runtime-function-error-body"]))
    assert error["errorType"] == "RuntimeError"
    assert error["errorMessage"] == "injected fault mid-stream"


def test_error_before_the_first_byte_goes_to_the_error_endpoint(runtime):
    server, lambda_app = runtime()
    lambda_app.fail_at_message = 0  # the response start itself fails: nothing is out yet
    result = server.result(server.invoke(url_event(stream=True)))

    assert result.kind == "error"
    assert result.headers["lambda-runtime-function-error-type"] == "RuntimeError"
    assert result.json()["errorType"] == "RuntimeError"
    # The worker goes on.
    lambda_app.fail_at_message = None
    after = server.result(server.invoke(url_event(stream=True, max_tokens=4)))
    assert sse_events(after.split_prelude()[1])[-1] == "[DONE]"


def test_four_invocations_in_flight_at_once_all_complete(runtime):
    server, _ = runtime(workers=4)
    server.hold_until_waiting(4)  # released only when four /next calls are pending together
    ids = [
        server.invoke(url_event(stream=True, max_tokens=16)),
        server.invoke(url_event(stream=True, max_tokens=16, content="Name a colour.")),
        server.invoke(load_event("direct-chat.json")),
        server.invoke(url_event(stream=False, max_tokens=16)),
    ]
    results = [server.result(i) for i in ids]

    assert server.max_in_flight == 4
    assert max(server.handed_at[i] for i in ids) < min(r.done_at for r in results)
    for result in results[:2]:
        assert sse_events(result.split_prelude()[1])[-1] == "[DONE]"
    assert results[2].kind == "response"
    assert results[2].json()["object"] == "chat.completion"
    assert json.loads(results[3].split_prelude()[1])["object"] == "chat.completion"


def test_a_crash_in_one_invocation_spares_the_others(runtime):
    server, _ = runtime(workers=4)
    server.hold_until_waiting(4)
    ids = [
        server.invoke(url_event(stream=True, max_tokens=16)),
        server.invoke({**load_event("direct-chat.json"), "crash": True}),
        server.invoke(b"{not json"),
        server.invoke(load_event("direct-chat.json")),
    ]
    stream, crash, garbage, direct = (server.result(i) for i in ids)

    assert sse_events(stream.split_prelude()[1])[-1] == "[DONE]"
    assert crash.kind == "error"
    assert crash.json() == {
        "errorMessage": "injected crash in the handler",
        "errorType": "RuntimeError",
        "stackTrace": [],
    }
    assert garbage.kind == "error" and garbage.json()["errorType"] == "Runtime.InvalidEvent"
    assert direct.json()["object"] == "chat.completion"
    # Every worker is still serving.
    server.wait_waiting(4)
    again = server.result(server.invoke(load_event("eventbridge-keep-warm.json")))
    assert again.json()["ok"] is True


def test_each_invocation_stops_at_its_own_deadline(runtime):
    server, _ = runtime(workers=2)
    counting = {"prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 900, "temperature": 0}
    short = server.invoke(counting, deadline_s=1.0)  # DEADLINE_MARGIN_MS=500 leaves ~0.5 s
    normal = server.invoke(load_event("direct-chat.json"))

    cut = server.result(short).json()
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] < 900  # cut by its deadline, not by max_tokens
    assert server.result(normal).json()["choices"][0]["finish_reason"] == "stop"


def test_buffered_invoke_mode_answers_http_events_like_awslambdaric(runtime):
    server, _ = runtime(invoke_mode="BUFFERED")
    result = server.result(server.invoke(url_event(stream=True, max_tokens=8)))

    assert result.kind == "response"  # Mangum's buffered shape, SSE inside the body
    answer = result.json()
    assert answer["statusCode"] == 200
    assert sse_events(answer["body"].encode())[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("env", "expected"),
    [({"N_CTX": "lots"}, "N_CTX"), ({"MODEL_URI": "/nonexistent/model.gguf"}, "model.gguf")],
)
def test_init_failure_is_one_line_on_the_init_error_endpoint(env, expected):
    with RuntimeAPIServer() as server:
        run_env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "MODEL_URI": str(model_path()),
            "AWS_LAMBDA_RUNTIME_API": server.address,
            **env,
        }
        proc = subprocess.run(
            [sys.executable, "-m", "handler", "runtime"],
            env=run_env,
            cwd=ROOT,
            capture_output=True,
            timeout=120,
            check=False,
        )
        error = server.wait_init_error()
    assert proc.returncode == 1
    assert error.headers["lambda-runtime-function-error-type"] == "Runtime.InitError"
    message = error.json()["errorMessage"]
    assert expected in message and "\n" not in message


def test_a_streamed_event_with_text_that_is_not_utf8_is_a_400_not_an_error(runtime):
    """GIVEN a function URL event whose body holds an unpaired surrogate WHEN it arrives in
    RESPONSE_STREAM mode THEN the stream carries a 400 OpenAI error, not an invocation error."""
    server, _ = runtime()
    event = url_event(stream=True)
    event["body"] = event["body"].replace("}", ', "user": "\ud800"}', 1)
    result = server.result(server.invoke(event))
    check_streaming_headers(result)
    prelude, body = result.split_prelude()
    assert prelude["statusCode"] == 400
    assert json.loads(body)["error"]["code"] == "invalid_encoding"
