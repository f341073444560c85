"""GIVEN INFERENCE_ENGINE=llama-server on the real model (llama.cpp's server built for the CPU from
the same vendored source, `make bench-anchors`) WHEN requests come through our app or Lambda entry
THEN they are answered as the in-process engine answers them, several at once."""

from __future__ import annotations

import gc
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from bench.common import free_port, http_ok, poll, serve_command, stop
from bench.runtime_api_server import RuntimeAPIServer
from handler.config import load_settings
from handler.engine import EngineState, SamplingParams
from handler.engine.llama_server import early
from handler.engine.llama_server.engine import LlamaServerEngine
from handler.engine.llama_server.sampling import completion_body
from tests.conftest import FakeContext, http_app, load_event, make_settings, model_path
from tests.integration.servers import _env

pytestmark = pytest.mark.integration

DEFAULT_SERVER = Path.home() / ".cache/coldstart/llama.cpp-build/bin/llama-server"
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name the capital of France in one word."},
]


def server_bin() -> str:
    path = Path(os.environ.get("COLDSTART_LLAMA_SERVER", DEFAULT_SERVER))
    if not path.is_file():
        pytest.fail(f"llama-server missing at {path}: run `make bench-anchors` (make test does)")
    return str(path)


def slot_env() -> dict[str, str]:
    """The environment of the llama-server engine the tests run: two slots, two threads."""
    return {
        "INFERENCE_ENGINE": "llama-server",
        "LLAMA_SERVER_BIN": server_bin(),
        "PARALLEL_SLOTS": "2",
        "N_THREADS": "2",
    }


def slot_settings(**overrides):
    return make_settings(**{**slot_env(), **overrides})


def started(settings) -> LlamaServerEngine:
    engine = LlamaServerEngine(settings)
    engine.start()
    engine.wait_loaded(60)
    return engine


@pytest.fixture(scope="module")
def slots():
    engine = started(slot_settings())
    assert engine.state in (EngineState.READY, EngineState.WARM), engine.status().reason
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(slots):
    return TestClient(http_app(slots, slots.settings))


def test_ready_with_load_phase_and_readiness(slots, client):
    status = slots.status().as_dict()
    assert status["phases_s"]["load_s"] > 0
    # Measured at load; status() itself only reads the last figure (it runs on the event loop).
    assert status["resident"]["bytes"] > 0
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["state"] in ("ready", "warm")


def test_prompt_and_greedy_answer_match_the_in_process_engine(slots, engine):
    params = SamplingParams(max_tokens=8, temperature=0.0)
    ours, ours_stops = engine.chat_prompt(MESSAGES)
    theirs, their_stops = slots.chat_prompt(MESSAGES)
    assert theirs == ours and their_stops == ours_stops
    assert slots.tokenize("Once upon a time") == engine.tokenize("Once upon a time")
    assert slots.generate(theirs, params).text() == engine.generate(ours, params).text()


def test_chat_completion_through_the_app(client):
    body = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    answer = client.post("/v1/chat/completions", json=body).json()
    choice = answer["choices"][0]
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stream_with_usage_ends_with_done(client):
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert '"completion_tokens":5' in lines[-2].replace(" ", "")
    assert '"finish_reason":"length"' in lines[-3].replace(" ", "")


def test_max_tokens_and_stop_sequences(slots):
    prompt = slots.tokenize("1, 2, 3, 4, 5,")
    short = slots.generate(prompt, SamplingParams(max_tokens=3, temperature=0.0))
    assert short.text() and short.result.finish_reason == "length"
    assert short.result.completion_tokens == 3
    stopped = slots.generate(prompt, SamplingParams(max_tokens=40, temperature=0.0, stop=("8",)))
    text = stopped.text()
    assert "8" not in text and "7" in text
    assert stopped.result.finish_reason == "stop"


def busy_slots(engine: LlamaServerEngine) -> int:
    """How many of the child's slots are working on a task (its /slots endpoint)."""
    slots: Any = engine._require_server().call("GET", "/slots")
    return sum(1 for slot in slots if slot["is_processing"])


def most_decoded(engine: LlamaServerEngine) -> int:
    """The most tokens any of the child's slots decoded for its latest task (/slots)."""
    slots: Any = engine._require_server().call("GET", "/slots")
    decoded = [slot["next_token"][0]["n_decoded"] for slot in slots if slot.get("next_token")]
    return max(map(int, decoded), default=0)  # a slot that never had a task has no next_token


def test_a_second_request_runs_while_the_first_is_generating(slots):
    long = slots.generate(slots.tokenize("1, 2, 3,"), SamplingParams(max_tokens=200))
    next(iter(long))  # the first request holds a slot and is decoding
    short = slots.generate(slots.tokenize("Hello"), SamplingParams(max_tokens=1))
    short.text()
    # One generation at a time would have finished all 200 tokens before this one started.
    assert long.result.completion_tokens < 200
    long.cancel()
    long.text()
    assert long.result.interrupted


def test_requests_go_out_at_once_and_count_until_read_cancelled_or_dropped(slots):
    """No thread of ours per request: the request is sent when the generation is made (the
    child works on both before either is read), its answer is read by the collector's one
    thread, and it stays in flight until it ends, is cancelled or dropped, which frees the
    child's slot too."""
    prompt = slots.tokenize("1, 2, 3,")
    params = SamplingParams(max_tokens=400, temperature=0.0)
    threads = threading.active_count()
    first, second = slots.generate(prompt, params), slots.generate(prompt, params)
    assert threading.active_count() <= threads + 1  # the collector's, at most
    assert slots._in_flight == 2
    poll(lambda: busy_slots(slots) == 2, 30)
    first.cancel()  # unread: dropped at the collector's next pass
    poll(lambda: slots._in_flight == 1, 5)
    assert first.result.interrupted
    assert next(iter(second))
    second.cancel()
    second.text()
    assert slots._in_flight == 0 and second.result.interrupted
    dropped = slots.generate(prompt, SamplingParams(max_tokens=2000, temperature=0.0))
    poll(lambda: busy_slots(slots) == 1, 30)
    assert slots._in_flight == 1
    del dropped  # nobody holds it but the collector, weakly
    gc.collect()
    poll(lambda: slots._in_flight == 0, 5)
    poll(lambda: busy_slots(slots) == 0, 30)
    assert most_decoded(slots) < 2000  # stopped, not finished


def test_a_buffered_request_cancelled_while_it_is_read_frees_its_slot(slots):
    """A buffered request that can be cancelled is streamed from the child (on the CPU, by
    default), which drops the task at its next token once the connection is closed. (A
    buffered /completion's hang-up is noticed only after a second in which no slot produced
    anything: the /slots polling here is enough load for llama-server to run it to the end.)"""
    cancel = threading.Event()
    generation = slots.generate(
        slots.tokenize("1, 2, 3,"),
        SamplingParams(max_tokens=2000, temperature=0.0),
        streaming=False,
        cancel=cancel,
    )
    texts: list[str] = []
    reader = threading.Thread(target=lambda: texts.append(generation.text()))
    reader.start()  # reading: the cancel comes while it is read
    poll(lambda: most_decoded(slots) >= 8, 30)  # a few tokens in, whatever the machine's speed
    cancel.set()
    reader.join(30)
    text = texts[0]  # what came before the cancel
    assert generation.result.interrupted
    assert generation.result.completion_tokens < 2000 and text.startswith(" 4, 5")
    assert slots._in_flight == 0
    poll(lambda: busy_slots(slots) == 0, 30)
    assert most_decoded(slots) < 2000  # stopped, not finished


def test_with_buffered_hangup_finish_a_buffered_request_is_one_answer_that_runs_on():
    """BUFFERED_HANGUP=finish: one answer from the child, which skips the per-token hand-over;
    the client's hang-up is not acted on, and the request runs to its last token, as it does
    with llama-server alone under load."""
    engine = started(slot_settings(BUFFERED_HANGUP="finish"))
    try:
        cancel = threading.Event()
        generation = engine.generate(
            engine.tokenize("1, 2, 3,"),
            SamplingParams(max_tokens=300, temperature=0.0),
            streaming=False,
            cancel=cancel,
        )
        poll(lambda: busy_slots(engine) == 1, 30)
        cancel.set()
        text = generation.text()
        assert generation.result.completion_tokens == 300 and not generation.result.interrupted
        assert text.startswith(" 4, 5")
    finally:
        engine.close()


def test_with_gpu_layers_a_buffered_request_is_one_answer_until_half_the_slots_are_busy():
    """BUFFERED_HANGUP=auto (the default) with layers on a GPU, two slots: the first buffered
    request (one slot of two busy) is one answer, which runs on to its last token after its
    client hangs up; the second, started while the first runs (both busy), is streamed from the
    child, and its hang-up frees its slot at once. (On the CPU, as the shared engine of these
    tests runs, a hang-up always cancels. This build has no GPU: llama-server runs the layers on
    the CPU all the same.)"""
    assert load_settings({"INFERENCE_ENGINE": "llama-server"}).buffered_hangup == "auto"
    engine = started(slot_settings(N_GPU_LAYERS="-1"))
    try:
        prompt = engine.tokenize("1, 2, 3,")
        first_hung_up, second_hung_up = threading.Event(), threading.Event()
        first = engine.generate(
            prompt,
            SamplingParams(max_tokens=300, temperature=0.0),
            streaming=False,
            cancel=first_hung_up,
        )
        second = engine.generate(
            prompt,
            SamplingParams(max_tokens=2000, temperature=0.0),
            streaming=False,
            cancel=second_hung_up,
        )
        poll(lambda: busy_slots(engine) == 2, 30)
        texts: list[str] = []
        reader = threading.Thread(target=lambda: texts.append(second.text()))
        reader.start()
        poll(lambda: most_decoded(engine) >= 8, 30)
        first_hung_up.set()
        second_hung_up.set()
        reader.join(30)
        assert second.result.interrupted and second.result.completion_tokens < 2000
        assert texts[0].startswith(" 4, 5")
        text = first.text()
        assert first.result.completion_tokens == 300 and not first.result.interrupted
        assert text.startswith(" 4, 5")
        poll(lambda: busy_slots(engine) == 0, 30)
    finally:
        engine.close()


@pytest.mark.parametrize("stop", [(" 9",), ()])
def test_a_buffered_answer_is_the_same_whether_a_client_can_cancel_it_or_not(slots, stop):
    """Cancellable, it is read from the child as a stream and handed on as one piece; otherwise
    it is one /completion answer: the same text, counts and finish either way."""
    params = SamplingParams(max_tokens=24, temperature=0.0, stop=stop)
    answers = []
    for cancel in (None, threading.Event()):
        generation = slots.generate(
            slots.tokenize("1, 2, 3,"), params, streaming=False, cancel=cancel
        )
        pieces = list(generation.pieces())
        result = generation.result
        answers.append((pieces, result.completion_tokens, result.finish_reason, result.interrupted))
    assert answers[0] == answers[1]
    pieces, tokens, finish, interrupted = answers[0]
    assert finish == ("stop" if stop else "length") and 0 < tokens <= 24 and not interrupted
    assert len(pieces) == 1 and pieces[0].text.startswith(" 4, 5")


def test_a_buffered_answers_logprobs_name_each_tokens_own_text(slots):
    """A stop string that holds text back (" " of " 9") must not move that text onto the next
    token's logprob, as llama-server's one-answer /completion does ('' then ' 4')."""
    params = SamplingParams(max_tokens=24, temperature=0.0, stop=(" 9",), logprobs=2)
    for cancel in (None, threading.Event()):
        generation = slots.generate(
            slots.tokenize("1, 2, 3,"), params, streaming=False, cancel=cancel
        )
        (piece,) = generation.pieces()
        assert all(entry.token for entry in piece.logprobs)
        assert "".join(entry.token for entry in piece.logprobs) == piece.text == " 4, 5, 6, 7, 8,"


def test_deadline_ends_the_generation_with_length(slots):
    generation = slots.generate(
        slots.tokenize("1, 2, 3,"),
        SamplingParams(max_tokens=1000, temperature=0.0),
        deadline=time.monotonic() + 0.5,
    )
    generation.text()
    assert generation.result.finish_reason == "length"
    assert generation.result.interrupted
    assert generation.result.completion_tokens < 1000


def test_embeddings_are_refused_with_a_clear_error(client):
    answer = client.post("/v1/embeddings", json={"input": "hello"})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "unsupported"


def test_context_overflow_is_a_400_before_any_generation(client):
    body = {"prompt": "word " * 2000, "max_tokens": 16}
    answer = client.post("/v1/completions", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "context_length_exceeded"


def test_lambda_direct_invoke_runs_on_the_server(capsys):
    from handler.aws_lambda.init import init

    app = init(time.perf_counter(), slot_settings())
    try:
        result = app(load_event("direct-chat.json"), FakeContext(remaining_ms=60_000))
        assert result["object"] == "chat.completion"
        assert result["usage"]["completion_tokens"] >= 1
        assert '"ColdStart"' in capsys.readouterr().out  # the same EMF line per invoke
    finally:
        app.engine.close()


def test_missing_binary_fails_with_its_name():
    engine = started(slot_settings(LLAMA_SERVER_BIN="/nonexistent/llama-server"))
    assert engine.state is EngineState.FAILED
    assert "LLAMA_SERVER_BIN" in (engine.status().reason or "")
    answer = TestClient(http_app(engine, engine.settings)).get("/readyz")
    assert answer.status_code == 503


def test_a_model_the_server_cannot_load_fails_with_its_exit(tmp_path):
    # A header our own checks accept (GGUF v3, one tensor, no metadata), then nothing.
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + b"\0" * 64)
    engine = started(slot_settings(MODEL_URI=str(bad)))
    assert engine.state is EngineState.FAILED
    assert "exited with code" in (engine.status().reason or "")


def test_a_server_that_dies_takes_readiness_down():
    engine = started(slot_settings())
    assert engine.state is EngineState.READY
    failed = threading.Event()

    def wait_failed():
        engine.wait_loaded(None)
        while engine.state is not EngineState.FAILED:
            time.sleep(0.01)
        failed.set()

    threading.Thread(target=wait_failed, daemon=True).start()
    engine._server._process.kill()  # as the OOM killer would
    assert failed.wait(10)
    assert "exited" in (engine.status().reason or "")


def test_close_stops_the_child():
    engine = started(slot_settings())
    process = engine._server._process
    engine.close()
    assert process.poll() is not None
    assert engine.state is EngineState.READY  # closing on purpose is not a failure


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=3, temperature=0.0),
        SamplingParams(max_tokens=40, temperature=0.0, stop=("8",)),
        SamplingParams(max_tokens=12, temperature=0.0),
    ],
)
def test_buffered_requests_match_streamed_ones(slots, params):
    prompt = slots.tokenize("1, 2, 3, 4, 5,")
    streamed = slots.generate(prompt, params)
    text = streamed.text()
    buffered = slots.generate(prompt, params, streaming=False)
    assert buffered.text() == text
    assert buffered.result.finish_reason == streamed.result.finish_reason
    assert buffered.result.completion_tokens == streamed.result.completion_tokens
    assert not buffered.result.interrupted


def test_buffered_request_stops_at_the_deadline_and_on_cancel(slots):
    prompt = slots.tokenize("1, 2, 3,")
    timed = slots.generate(
        prompt,
        SamplingParams(max_tokens=1000, temperature=0.0),
        deadline=time.monotonic() + 0.5,
        streaming=False,
    )
    timed.text()
    assert timed.result.interrupted and timed.result.finish_reason == "length"
    assert timed.result.completion_tokens < 1000
    cancelled = slots.generate(
        prompt, SamplingParams(max_tokens=1000, temperature=0.0), streaming=False
    )
    cancelled.cancel()
    cancelled.text()
    assert cancelled.result.interrupted


def legacy_body(prompt: list[int], params: SamplingParams) -> dict:
    """The /completion body sent before issue 15: every sampler listed, top_k 0, for every shape."""
    return {
        "prompt": prompt,
        "n_predict": params.max_tokens,
        "cache_prompt": True,
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "typical_p": 1.0,
        "repeat_penalty": params.repeat_penalty,
        "repeat_last_n": 64,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "dry_multiplier": 0.0,
        "xtc_probability": 0.0,
        "mirostat": 0,
        "seed": params.seed if params.seed is not None else -1,
        "samplers": ["penalties", "top_k", "top_p", "min_p", "temperature"],
    }


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=32, temperature=0.0),
        SamplingParams(max_tokens=32, temperature=0.0, presence_penalty=0.8),
        SamplingParams(max_tokens=32, temperature=0.9, top_p=0.9, seed=1234),
        SamplingParams(max_tokens=32, temperature=0.7, frequency_penalty=0.5, seed=99),
    ],
    ids=["greedy", "greedy-penalty", "top-p-seeded", "penalty-seeded"],
)
def test_the_cheap_sampling_body_picks_the_same_tokens_as_the_old_one(slots, params):
    """The same chain, fewer passes: the tokens of a fixed prompt do not change."""
    server = slots._require_server()
    prompt = slots.tokenize("Once upon a time, in a small village by the sea,")

    def tokens(body: dict) -> list[int]:
        answer = server.call(
            "POST", "/completion", {**body, "stream": False, "return_tokens": True}
        )
        return answer["tokens"]

    before = tokens(legacy_body(prompt, params))
    after = tokens(completion_body(prompt, params, stream=False))
    assert len(before) == params.max_tokens
    assert after == before
    # The same chain run on the device (here the CPU backend, in the decode graph).
    on_backend = completion_body(prompt, params, stream=False, on_backend=True)
    assert on_backend["backend_sampling"] is True
    assert tokens(on_backend) == before


def test_device_and_host_sampling_share_a_batch(slots):
    """BACKEND_SAMPLING=auto switches per request, so one decode batch can hold slots that
    sample on the device beside slots that sample on the host: each gets its own tokens."""
    server = slots._require_server()
    prompt = slots.tokenize("The old lighthouse keeper climbed the stairs and")
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    drawn = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=7)

    def tokens(params: SamplingParams, on_backend: bool) -> list[int]:
        body = completion_body(prompt, params, stream=False, on_backend=on_backend)
        return server.call("POST", "/completion", {**body, "return_tokens": True})["tokens"]

    alone = {name: tokens(p, False) for name, p in (("greedy", greedy), ("drawn", drawn))}
    together: dict[str, list[int]] = {}

    def run(name: str, params: SamplingParams, on_backend: bool) -> None:
        together[name] = tokens(params, on_backend)

    pairs = [("greedy", greedy, True), ("drawn", drawn, False)]
    threads = [threading.Thread(target=run, args=pair) for pair in pairs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert together == alone


def test_the_engine_reads_ahead_once_the_child_is_up_and_the_app_is_built(tmp_path):
    """GIVEN no prefetch at init (the llama-server engine's default) WHEN the child answers HTTP
    and the entry point says its app is built THEN the engine reads the model ahead itself; not
    before both (the child's libraries and our imports come from the same storage)."""
    from tests.integration.test_prefetch import evicted_copy

    copy = evicted_copy(model_path(), tmp_path)  # out of the page cache: worth reading ahead
    engine = LlamaServerEngine(slot_settings(model_uri=str(copy)))
    engine.start()
    try:
        assert engine.wait_loaded(60) in (EngineState.READY, EngineState.WARM)
        assert engine.prefetch is None  # the child is up, the app not built yet
        engine.app_built()
        # llama-server's own load read the whole (small) file meanwhile: nothing is left to
        # read ahead, and a resident model is not read again.
        assert engine.prefetch is None
    finally:
        engine.close()


def test_the_app_built_first_then_the_child_starts_the_read_ahead(tmp_path):
    """The usual order with a small model: our imports are done before the child listens, so
    the read-ahead starts when it does, reading the model beside llama-server's load."""
    from tests.integration.test_prefetch import evicted_copy

    copy = evicted_copy(model_path(), tmp_path)
    engine = LlamaServerEngine(slot_settings(model_uri=str(copy)))
    engine.app_built()
    engine.start()
    try:
        assert engine.wait_loaded(60) in (EngineState.READY, EngineState.WARM)
        prefetch = engine.prefetch
        assert prefetch is not None
        assert prefetch.wait(60) and prefetch.error is None and prefetch.bytes_read > 0
    finally:
        engine.close()


def test_init_prefetch_waits_while_llama_server_starts():
    """GIVEN a running init prefetch WHEN the engine spawns llama-server THEN that read stops
    (the child's libraries come from the same storage) and a fresh one runs once the child
    answers HTTP, reading the whole file."""
    from handler.model_source.prefetch import Prefetch

    settings = slot_settings()
    # One reader, small chunks: still reading when the engine spawns the child.
    first = Prefetch(Path(settings.model_uri), readers=1, budget_bytes=1 << 40, chunk_bytes=512)
    engine = LlamaServerEngine(settings, prefetch=first.start())
    engine.start()
    try:
        assert engine.wait_loaded(60) in (EngineState.READY, EngineState.WARM)
        assert first.wait(10) and first.bytes_read < first.planned_bytes
        second = engine.prefetch
        assert second is not None and second is not first
        assert second.wait(60) and second.bytes_read == second.planned_bytes
    finally:
        engine.close()


def sigterm_stops_it_and_its_children(proc: subprocess.Popen[bytes]) -> None:
    """Send SIGTERM to `proc` (serving, with llama-server started by its engine thread): it
    exits 143 and every child its threads spawned is gone; any still there is killed after."""
    tasks = Path(f"/proc/{proc.pid}/task").iterdir()
    children = [int(pid) for task in tasks for pid in (task / "children").read_text().split()]
    assert children, "no llama-server child"
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        poll(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in children), 10, 0.05)
    finally:
        for pid in children:
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_the_server_and_its_llama_server_child():
    """GIVEN `python -m handler serve` on the llama-server engine WHEN it gets SIGTERM (how ECS
    and Kubernetes stop a task) THEN it shuts down and stops its child, exiting 143; uvicorn
    re-raises the signal after its graceful shutdown, which used to end the process at once and
    leave llama-server running."""
    port = free_port()
    proc = subprocess.Popen(
        serve_command(port),
        env=_env(slot_env()),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        poll(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), 60, 0.05, proc=proc)
        sigterm_stops_it_and_its_children(proc)
    finally:
        stop(proc)


def test_sigterm_stops_the_runtime_loop_and_its_llama_server_child():
    """GIVEN `python -m handler runtime` on the llama-server engine, serving WHEN Lambda's
    shutdown sends SIGTERM THEN it exits 143 and its child is gone."""
    with RuntimeAPIServer() as server:
        env = {**_env(slot_env()), "AWS_LAMBDA_RUNTIME_API": server.address, "RUNTIME": "coldstart"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "handler", "runtime"],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            request = server.invoke({"prompt": "Hello", "max_tokens": 2})
            assert server.result(request, timeout_s=120).json()["object"] == "text_completion"
            sigterm_stops_it_and_its_children(proc)
        finally:
            stop(proc)


def early_env(**overrides: str) -> dict[str, str]:
    return {"MODEL_URI": str(model_path()), "N_CTX": "1024", **slot_env(), **overrides}


def test_the_engine_takes_over_the_child_spawned_early():
    """GIVEN the child spawned by the entry point before the engine existed WHEN the engine
    loads with the same settings THEN it serves through that process (no second spawn)."""
    server = early.spawn(early_env())
    assert server is not None and not server.exited()
    assert early.spawn(early_env()) is server  # once per process
    engine = started(slot_settings())
    try:
        assert engine._server is server
        assert engine.state in (EngineState.READY, EngineState.WARM), engine.status().reason
        answer = engine.generate(engine.tokenize("Once upon a time"), SamplingParams(max_tokens=4))
        assert answer.text()
    finally:
        engine.close()
    assert server.exited()


def test_a_child_spawned_early_with_other_settings_is_stopped_and_replaced():
    """GIVEN an early child whose command line is not the engine's (another N_CTX) WHEN the
    engine loads THEN that child is stopped and the engine starts its own."""
    server = early.spawn(early_env(N_CTX="512"))
    assert server is not None
    engine = started(slot_settings())
    try:
        assert server.exited()
        assert engine._server is not server and not engine._server.exited()
    finally:
        engine.close()


def test_serve_spawns_the_child_before_it_imports_the_engine():
    """GIVEN `python -m handler serve` on the llama-server engine WHEN it starts THEN the child
    it spawned first is the one that serves: one spawn in the log, taken over by the engine."""
    port = free_port()
    with tempfile.TemporaryFile("w+") as sink:
        proc = subprocess.Popen(
            serve_command(port),
            env=_env(slot_env()),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
        try:
            poll(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), 60, 0.05, proc=proc)
        finally:
            stop(proc, grace_s=10)
        sink.seek(0)
        log = sink.read()
    assert log.count("coldstart.llama_server starting ") == 1, log
    assert "llama-server was started early" in log, log
