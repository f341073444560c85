"""The built image: its metadata, every event in events/ under the real RIE, and server mode.

Each event's response is checked by the shape its source promises: HTTP sources (function URL,
API Gateway, ALB) a 200 with an OpenAI body, the keep-warm ping a state, a direct invoke the
OpenAI body itself.
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import time
from typing import Any

import pytest

from .conftest import (
    EVENTS_DIR,
    FIGURES,
    FIRST_EVENT,
    IMAGE,
    INVOKE_PATH,
    ROOT,
    Container,
    engine,
    load_event,
    save_logs,
    start,
    start_under_rie,
)

EVENT_FILES = sorted(p.name for p in EVENTS_DIR.glob("*.json"))
# sam build (the image again, with the template's build args, mostly from the layer cache) and
# sam local invoke (which builds its own image on top of that one).
SAM_LOCAL_TIMEOUT_S = 900


# ------------------------------------------------------------------------ response shapes


def check_usage(body: dict[str, Any]) -> None:
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_chat(body: dict[str, Any]) -> None:
    """A chat answer: text, or tool calls whose arguments are JSON; structured text parses."""
    assert body["object"] == "chat.completion", body
    choice = body["choices"][0]
    message = choice["message"]
    assert message["role"] == "assistant"
    if message.get("tool_calls"):
        assert choice["finish_reason"] == "tool_calls", body
        for call in message["tool_calls"]:
            assert call["function"]["name"] and call["id"]
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
    else:
        assert isinstance(message["content"], str) and message["content"]
        assert choice["finish_reason"] in {"stop", "length"}
    check_usage(body)


def check_structured(request: dict[str, Any], body: dict[str, Any]) -> None:
    """An answer under response_format json_schema: it parses and has the required keys."""
    check_chat(body)
    schema = request["response_format"]["json_schema"]["schema"]
    answer = json.loads(body["choices"][0]["message"]["content"])
    assert set(schema.get("required", [])) <= set(answer), answer


def check_completion(body: dict[str, Any]) -> None:
    assert body["object"] == "text_completion", body
    choice = body["choices"][0]
    assert isinstance(choice["text"], str) and choice["text"]
    assert choice["finish_reason"] in {"stop", "length"}
    check_usage(body)


def check_embeddings(body: dict[str, Any], inputs: list[str]) -> None:
    assert body["object"] == "list", body
    assert [d["index"] for d in body["data"]] == list(range(len(inputs)))
    for item in body["data"]:
        vector = item["embedding"]
        assert len(vector) > 0 and all(isinstance(x, float) for x in vector)
        assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-3)


def check_models(body: dict[str, Any]) -> None:
    assert body["object"] == "list", body
    assert body["data"] and body["data"][0]["object"] == "model" and body["data"][0]["id"]


def check_sse(text: str) -> None:
    """A chat stream: chunks, a usage-only chunk last (include_usage), then [DONE]."""
    data = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", text[-500:]
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    arguments = "".join(
        call["function"].get("arguments") or "" for d in deltas for call in d.get("tool_calls", [])
    )
    assert content or isinstance(json.loads(arguments), dict), text[-500:]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def check_response(body: dict[str, Any]) -> None:
    assert body["object"] == "response", body
    assert body["status"] in {"completed", "incomplete"}
    [message] = body["output"]
    assert message["type"] == "message" and message["content"][0]["text"]
    assert body["usage"]["total_tokens"] > 0


def check_response_events(text: str) -> None:
    """A Responses stream: named events, numbered, the last one the whole response; no [DONE]."""
    blocks = [block.split("\n") for block in text.strip().split("\n\n")]
    events = [json.loads(data.removeprefix("data: ")) for _, data in blocks]
    assert [name for name, _ in blocks] == [f"event: {e['type']}" for e in events], text[-500:]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    check_response(events[-1]["response"])


def request_body(event: dict[str, Any]) -> dict[str, Any]:
    raw = event.get("body") or ""
    if event.get("isBase64Encoded"):
        raw = base64.b64decode(raw).decode()
    return json.loads(raw) if raw else {}


def check_http(event: dict[str, Any], response: dict[str, Any]) -> None:
    """Mangum's answer for a function URL, API Gateway or ALB event."""
    assert response.get("statusCode") == 200, response
    headers = {k.lower(): v for k, v in (response.get("headers") or {}).items()}
    body = response.get("body") or ""
    if response.get("isBase64Encoded"):
        body = base64.b64decode(body).decode()
    path = event.get("rawPath") or event["path"]
    request = request_body(event)
    if request.get("stream"):
        assert headers["content-type"].startswith("text/event-stream")
        if path.endswith("/responses"):
            check_response_events(body)
        else:
            check_sse(body)
        return
    assert headers["content-type"].startswith("application/json")
    if path.endswith("/chat/completions"):
        check_chat(json.loads(body))
    elif path.endswith("/completions"):
        check_completion(json.loads(body))
    elif path.endswith("/models"):
        check_models(json.loads(body))
    else:
        pytest.fail(f"no check for HTTP path {path}: add one to tests/image/test_image.py")


def is_keep_warm(event: dict[str, Any]) -> bool:
    """A scheduled event (EventBridge rule or Scheduler) or the template's Scheduler input."""
    scheduled = event.get("source") in {"aws.events", "aws.scheduler"}
    return scheduled or event.get("coldstart") == "keep-warm"


def check_keep_warm(response: dict[str, Any]) -> None:
    assert response["ok"] is True and response["state"] == "warm", response
    assert response["lazy_mmap"] is True, "the image preloads the lazy_mmap shim"


def check_event_response(event: dict[str, Any], response: Any) -> None:
    """Dispatch on the event's documented fields, like the handler does."""
    if "requestContext" in event:
        check_http(event, response)
    elif is_keep_warm(event):
        check_keep_warm(response)
    elif "messages" in event and "response_format" in event:
        check_structured(event, response)
    elif "messages" in event:
        check_chat(response)
    elif "prompt" in event:
        check_completion(response)
    elif "input" in event and "instructions" in event:  # embeddings take no instructions
        check_response(response)
    elif "input" in event:
        check_embeddings(response, event["input"])
    else:
        pytest.fail("no check for this event kind: add one to tests/image/test_image.py")


def invoke(container: Container, name: str) -> Any:
    status, _, raw = container.request(INVOKE_PATH, load_event(name))
    assert status == 200, f"RIE answered {status}: {raw[:500]!r}\n{container.logs()[-3000:]}"
    response = json.loads(raw)
    if isinstance(response, dict) and "errorMessage" in response:
        pytest.fail(f"{name}: function error {response}\n{container.logs()[-3000:]}")
    return response


# ------------------------------------------------------------------------------------ tests


def test_image_runs_as_non_root_with_lambda_cmd(config: dict[str, Any]) -> None:
    assert config.get("User") not in (None, "", "0", "root", "0:0")
    assert config["Cmd"][-3:] == ["-m", "handler", "lambda"]  # awslambdaric unless streaming
    FIGURES["image size"] = (
        f"{int(engine('image', 'inspect', '--format', '{{.Size}}', IMAGE)) / 1e6:.1f} MB"
    )


def test_image_has_no_compilers() -> None:
    found = engine(
        "run", "--rm", "--pull=never", "--entrypoint", "sh", IMAGE, "-c",
        "for c in gcc cc c++ g++ clang make cmake; do command -v $c || true; done",
    )  # fmt: skip
    assert found.strip() == ""


def test_every_handler_module_imports() -> None:
    """The pinned deps cover every module, including paths the events do not reach (S3, runtime)."""
    script = (
        "import importlib, pkgutil, handler\n"
        "skip = {'lambda_function', '__main__'}  # importing these runs init / the CLI\n"
        "names = [m.name for m in pkgutil.iter_modules(handler.__path__) if m.name not in skip]\n"
        "for name in names: importlib.import_module('handler.' + name)\n"
        "print(len(names))"
    )
    out = engine("run", "--rm", "--pull=never", "--read-only", IMAGE, "python", "-c", script)
    assert int(out.strip()) > 5


def test_cold_start_first_response(lambda_container: Container) -> None:
    assert lambda_container.first is not None
    status, _, raw = lambda_container.first
    assert status == 200, raw[:500]
    check_event_response(load_event(FIRST_EVENT), json.loads(raw))


@pytest.mark.parametrize("name", EVENT_FILES)
def test_event(lambda_container: Container, name: str) -> None:
    started = time.monotonic()
    response = invoke(lambda_container, name)
    FIGURES[f"lambda: warm invoke {name}"] = f"{(time.monotonic() - started) * 1000:.0f} ms"
    check_event_response(load_event(name), response)


def test_scheduler_ping_warms_a_fresh_function(config: dict[str, Any]) -> None:
    """GIVEN the image under the RIE, nothing invoked yet (WARMUP=lazy: loaded, not warm)
    WHEN the input the template's Scheduler sends arrives first THEN the model is warm."""
    container = start_under_rie(config["Cmd"])
    try:
        container.wait_http("/")
        response = invoke(container, "scheduler-keep-warm-input.json")
        check_keep_warm(response)
        assert "warmup_s" in response["phases_s"], response  # this ping ran the warm-up
        FIGURES["scheduler ping: container start -> warm"] = f"{container.elapsed():.2f} s"
    finally:
        save_logs(container, "scheduler")
        container.remove()


def last_json_object(text: str) -> dict[str, Any]:
    """The last line of `text` that is a JSON object (sam prints the function's answer there)."""
    for line in reversed(text.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    pytest.fail(f"no JSON answer in:\n{text[-3000:]}")


def test_sam_local_invoke_answers_a_chat() -> None:
    """GIVEN the template, whose two functions make sam ask for a logical id WHEN `make
    sam-local` runs (sam build, then sam local invoke through podman's Docker API) THEN the
    default function answers the function URL chat event with a chat completion."""
    started = time.monotonic()
    done = subprocess.run(
        ["make", "--no-print-directory", "sam-local", f"EVENT=events/{FIRST_EVENT}"],
        cwd=ROOT, capture_output=True, text=True, timeout=SAM_LOCAL_TIMEOUT_S, check=False,
    )  # fmt: skip
    log = ROOT / ".cache" / "image-test-sam-local.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"make sam-local failed ({log}):\n{done.stderr[-3000:]}"
    FIGURES["make sam-local (sam build cached + sam local invoke)"] = (
        f"{time.monotonic() - started:.1f} s"
    )
    check_http(load_event(FIRST_EVENT), last_json_object(done.stdout))


def test_http_server_mode() -> None:
    """The same image as an HTTP server, chosen by overriding the command."""
    container = start(["python", "-m", "handler", "serve"])
    try:
        assert container.wait_http("/healthz") == 200
        assert container.wait_http("/readyz", want={200}) == 200
        FIGURES["server: container start -> /readyz 200"] = f"{container.elapsed():.2f} s"
        status, _, raw = container.request("/v1/chat/completions", load_event("direct-chat.json"))
        assert status == 200, raw[:500]
        check_chat(json.loads(raw))
        FIGURES["server: container start -> first chat completion"] = f"{container.elapsed():.2f} s"
        status, _, raw = container.request("/v1/models")
        assert status == 200
        check_models(json.loads(raw))
    finally:
        save_logs(container, "server")
        container.remove()


def test_http_server_mode_with_a_health_port() -> None:
    """The server with HEALTH_PORT: the health responder answers on it (here the published
    port), inside the read-only, non-root container, while the API serves on its own port."""
    api = "8081"
    env = {"PORT": api, "HEALTH_PORT": "8080"}
    container = start(["python", "-m", "handler", "serve"], env=env)
    try:
        assert container.wait_http("/readyz", want={200}) == 200
        status, _, raw = container.request("/healthz")
        assert status == 200
        assert json.loads(raw)["state"] in ("ready", "warm")
        chat = json.dumps(load_event("direct-chat.json"))
        ask = (
            "import sys, urllib.request as u; "
            f"r = u.Request('http://127.0.0.1:{api}/v1/chat/completions', "
            "data=sys.argv[1].encode(), headers={'content-type': 'application/json'}); "
            "print(u.urlopen(r, timeout=120).read().decode())"
        )
        answer = engine("exec", container.name, "python", "-c", ask, chat, timeout=180)
        check_chat(json.loads(answer))
        # The request warmed the model; the board follows.
        deadline = time.monotonic() + 10
        while json.loads(container.request("/healthz")[2])["state"] != "warm":
            assert time.monotonic() < deadline, "the health port never saw the warm state"
            time.sleep(0.05)
    finally:
        save_logs(container, "server-health-port")
        container.remove()


def test_response_stream_mode(config: dict[str, Any]) -> None:
    """INVOKE_MODE=RESPONSE_STREAM: the image's command runs our Runtime API loop, which streams
    a prelude, 8 NUL bytes, then the SSE body."""
    container = start_under_rie(config["Cmd"], env={"INVOKE_MODE": "RESPONSE_STREAM"})
    try:
        container.wait_http("/")
        status, _, raw = container.request(INVOKE_PATH, load_event("function-url-chat-stream.json"))
        assert status == 200, raw[:500]
        FIGURES["stream: container start -> whole streamed response"] = (
            f"{container.elapsed():.2f} s"
        )
        prelude, sep, body = raw.partition(b"\0" * 8)
        assert sep, f"no prelude delimiter in {raw[:300]!r}"
        head = json.loads(prelude)
        assert head["statusCode"] == 200
        assert head["headers"]["content-type"].startswith("text/event-stream")
        check_sse(body.decode())
    finally:
        save_logs(container, "stream")
        container.remove()
