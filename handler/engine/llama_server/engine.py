"""INFERENCE_ENGINE=llama-server: llama.cpp's own server, a child process with parallel slots.

The in-process engine runs one generation at a time. On a GPU that leaves most of the card idle:
a decode step for one sequence costs nearly what a step for sixty-four costs. llama.cpp's server
batches the decode steps of all its slots (continuous batching), so this engine hands the
generation to it while our process keeps everything else the API promises: readiness, errors,
auth, limits, deadlines, metrics and the Lambda entry points.

Prompts are rendered with the model's chat template here (the same `ChatTemplate` as the in-process
engine), tokenized by the child's vocabulary and sent as token ids; context checks and stop
sequences run here too, so both engines answer a request the same way. The child itself is
`handler.engine.llama_server.process`.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from handler import deadline as deadlines
from handler.config import Settings
from handler.deadline import Deadline
from handler.engine.chat_template import ChatTemplate
from handler.engine.engine_base import EngineBase
from handler.engine.generation import (
    Generation,
    Piece,
    PulledGeneration,
    PushedGeneration,
    SamplingParams,
)
from handler.engine.lifecycle import EngineState, EngineStatus
from handler.engine.llama_server import early
from handler.engine.llama_server.collector import Collector
from handler.engine.llama_server.process import (
    AnswerBroken,
    LlamaServer,
    ServerError,
    read_answer,
    send_completion,
)
from handler.engine.llama_server.reading import StreamReading
from handler.engine.llama_server.sampling import completion_body, samples_on_backend
from handler.engine.prompts import WARMUP_PROMPT
from handler.errors import InvalidRequest
from handler.model_source import Progress, ResolvedModel, resolve_model
from handler.model_source.prefetch import Prefetch, start_for

if TYPE_CHECKING:
    from handler.engine.llama_server.upstream import Connection

log = logging.getLogger("coldstart.llama_server")


class Gate:
    """Runs `then` once, on the thread of the last of `count` arrivals."""

    def __init__(self, count: int, then: Callable[[], None]) -> None:
        self._left = count
        self._then = then
        self._lock = threading.Lock()

    def arrive(self) -> None:
        """One arrival; the last one runs `then`."""
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._then()


def hangup_cancels(settings: Settings, in_flight: int) -> bool:
    """Whether a buffered request whose client can hang up, starting with `in_flight`
    generations running (its own included), is streamed from the child so that a hang-up drops
    its task at the next token, rather than asked for as one answer that runs to its end (under
    load llama-server notices no hang-up of a buffered /completion, `_send`).

    BUFFERED_HANGUP cancel: always; finish: never; auto: on the CPU, or once more than half the
    slots are busy. One answer spares llama-server its per-token hand-over of a streamed answer
    (on the H200, llama-server alone did 1,548 / 3,383 tok/s buffered at 4 / 16 clients against
    1,466 / 2,615 streamed) and our process a read per token; a request that runs on after its
    client left then holds a slot while at least half of them are free, and on a GPU its row in
    the batch costs little (decoding is bound by reading the weights). On the CPU every row is
    compute the others wait for, and what one answer saves is small (our CPU per buffered token
    0.88x on a 2-vCPU VM), so a hang-up always cancels there; so it does when slots are scarce,
    where a freed slot is worth more than the hand-over.
    """
    if settings.buffered_hangup == "auto":
        return settings.n_gpu_layers == 0 or in_flight * 2 > settings.parallel_slots
    return settings.buffered_hangup == "cancel"


class LlamaServerEngine(EngineBase):
    """The engine contract, served by a llama-server child process."""

    thread_name = "coldstart-slots"

    def __init__(
        self,
        settings: Settings,
        resolver: Callable[[Settings, Progress], ResolvedModel] = resolve_model,
        prefetch: Prefetch | None = None,
    ) -> None:
        super().__init__(settings, resolver, prefetch)
        self._server: LlamaServer | None = None
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._closing = False
        # The read-ahead started here waits for the child to answer HTTP (its libraries read)
        # and for the entry point's imports (`app_built`): both read the storage the model is on.
        self._prefetch_gate = Gate(2, self._prefetch_when_both_arrived)
        self._collector = Collector()

    # ----------------------------------------------------------------- lifecycle

    def _queue_depth(self) -> int:
        """Requests waiting for a free slot."""
        return max(0, self._in_flight - self.settings.parallel_slots)

    def warm_up(self, deadline: Deadline = None) -> EngineStatus:
        """One tiny generation through the server (later calls return at once)."""
        self.require_loaded(deadline)
        with self.lifecycle.warm_lock:
            if self.lifecycle.state is EngineState.READY:
                with self.lifecycle.timed("warmup_s"):
                    prompt = self.tokenize(WARMUP_PROMPT, add_bos=True)
                    self._require_server().call(
                        "POST", "/completion", {"prompt": prompt, "n_predict": 1}
                    )
                self.lifecycle.warmed()
        return self.status()

    def restored(self) -> None:
        """After a restore: the child must have survived the snapshot; its threads stay as
        they were started (a new count would need a new child)."""
        server = self._server
        if server is None or server.exited() or self.lifecycle.state is EngineState.FAILED:
            reason = self.lifecycle.reason or (server.last_error() if server else "not started")
            raise ServerError(f"llama-server is not running after the restore: {reason}")

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a grace period)."""
        self._closing = True
        if self._server is not None:
            self._server.stop()

    def _run(self) -> None:
        try:
            self._load()
        except Exception:
            self.close()
            raise  # the lifecycle turns it into `failed`
        self.lifecycle.ready()
        if self.settings.warmup == "init":
            try:
                self.warm_up()
            except Exception:
                log.exception("warm-up failed")
        self._watch()

    def _load(self) -> None:
        with self.lifecycle.timed("resolve_s"):
            self._model = self._resolver(self.settings, self.lifecycle.on_download_progress)
        # The chat template's engine, imported while the child loads rather than after it (about
        # 0.1 s from a cold disk, between llama-server's ready and ours).
        threading.Thread(
            target=importlib.import_module, args=("jinja2.sandbox",), daemon=True
        ).start()
        with self.lifecycle.timed("load_s"):
            path = str(self._model.path)
            self._server = early.take(self.settings, path) or LlamaServer(self.settings, path)
            atexit.register(self.close)
            self._server.start(on_listening=self._pause_prefetch())
        props = self._server.call("GET", "/props")
        slot_ctx = props.get("default_generation_settings", {}).get("n_ctx")
        if slot_ctx is not None and int(slot_ctx) < self.settings.n_ctx:
            raise ServerError(f"llama-server gives each slot {slot_ctx} tokens, < N_CTX")
        if props.get("chat_template"):
            bos, eos = props.get("bos_token") or "", props.get("eos_token") or ""
            self._chat_template = ChatTemplate(props["chat_template"], bos, eos)
        assert self._model is not None
        # mincore over the whole file (0.1 s for 2.35 GB on a slow core) runs beside the requests.
        threading.Thread(
            target=self._residency.refresh,
            args=(self._model.path,),
            name="coldstart-residency",
            daemon=True,
        ).start()
        log.info(
            "llama-server ready on port %d with %d slots in %.3fs",
            self._server.port,
            self.settings.parallel_slots,
            self.lifecycle.phases.load_s,
        )

    def _pause_prefetch(self) -> Callable[[], None] | None:
        """What runs when the child first answers HTTP: the start of the model's read-ahead.

        The child's own executable and libraries (CUDA's are hundreds of MB) come from the same
        storage: with the prefetch reading the model at full speed beside them, the child took
        1.8 s instead of 0.4 s to start on the H200 machine (bench/p6_gpu_cold.py). Init starts
        none for this engine (`start_at_init`); the one started here also waits for `app_built`.
        A prefetch handed in already running (an embedder's) is stopped until then, and a fresh
        one starts; what the first one read is in the page cache already.
        """
        first = self.prefetch
        if first is None:
            return self._prefetch_gate.arrive
        if first.done:
            return None
        first.stop()

        def resume() -> None:
            self.prefetch = Prefetch(
                first.path, first.readers, first.budget_bytes, chunk_bytes=first.chunk_bytes
            ).start()

        return resume

    def app_built(self) -> None:
        """Our web stack is imported: the read-ahead may start once the child is up too."""
        self._prefetch_gate.arrive()

    def _prefetch_when_both_arrived(self) -> None:
        self.prefetch = start_for(self.settings)

    def _watch(self) -> None:
        """A server that dies takes the engine to `failed`: readiness then answers 503."""
        server = self._require_server()
        code = server.wait()
        if not self._closing:
            self.lifecycle.fail(f"llama-server exited with code {code}: {server.last_error()}")

    def _require_server(self) -> LlamaServer:
        if self._server is None:
            self.lifecycle.require_usable()
            raise ServerError("llama-server is not running")
        return self._server

    # ----------------------------------------------------------------- prompts

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Tokens of `text`, by the server's vocabulary."""
        self.lifecycle.require_usable()
        body = {"content": text, "add_special": add_bos, "parse_special": special}
        tokens: list[int] = self._require_server().call("POST", "/tokenize", body)["tokens"]
        return tokens

    # ----------------------------------------------------------------- generation

    def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        deadline: Deadline = None,
        streaming: bool = True,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Send the request to the child now (a free slot starts on it at once). A stream's
        answer is read by the collector's one thread and pushed into the generation; a buffered
        one is read when the result is iterated, on that thread (through the collector)."""
        self.lifecycle.require_usable()
        server = self._require_server()
        self.lifecycle.warmed()  # the first real request warms the model
        with self._in_flight_lock:
            self._in_flight += 1
            in_flight = self._in_flight
        on_backend = samples_on_backend(self.settings, in_flight)
        # One non-streamed answer for a buffered request nobody can cancel, or whose hang-up
        # may run on (`hangup_cancels`); never with logprobs (`_send`).
        cancellable = cancel is not None and hangup_cancels(self.settings, in_flight)
        one_answer = not streaming and not cancellable and params.logprobs is None
        left = deadlines.seconds_left(deadline, floor_s=0.05)
        # A blocking read times out at the deadline; one answer is ended by llama-server's own
        # time limit, so its socket waits a little longer. (The collector's sockets do not
        # block: it checks the deadline itself.)
        conn = server.connect(left + 1.0 if one_answer and left is not None else left)

        def release() -> None:  # once: the pulled generation and the collector see to it
            conn.close()  # mid-answer, this makes llama-server drop the slot's task
            with self._in_flight_lock:
                self._in_flight -= 1

        if streaming:
            pushed = PushedGeneration(len(prompt), cancel, self._collector.sweep_soon)
            if not pushed.begin(params.max_tokens, deadline):
                release()
                pushed.finish()
                return pushed
            try:
                self._stream(
                    conn, prompt, params, deadline, pushed, release=release, on_backend=on_backend
                )
            except BaseException:
                release()
                pushed.finish()
                raise
            return pushed
        generation = PulledGeneration(len(prompt), cancel, release)
        if not generation.begin(params.max_tokens, deadline):
            generation.end_unread()
            return generation
        try:
            source = self._send(
                conn,
                prompt,
                params,
                deadline,
                generation,
                one_answer=one_answer,
                on_backend=on_backend,
            )
        except BaseException:
            generation.end_unread()
            raise
        generation.read_from(source)
        return generation

    def _stream(
        self,
        conn: Connection,
        prompt: list[int],
        params: SamplingParams,
        deadline: float | None,
        out: PushedGeneration,
        *,
        release: Callable[[], None],
        on_backend: bool,
    ) -> None:
        """Send a streamed /completion now; the collector pushes its pieces into `out`, and
        calls `release` once it has closed the connection."""
        body = completion_body(prompt, params, stream=True, on_backend=on_backend)
        reading = StreamReading(params, out.result)  # its clock starts before the send
        send_completion(conn, body)
        self._collector.stream(conn, reading, out, deadline, release)

    def _send(
        self,
        conn: Connection,
        prompt: list[int],
        params: SamplingParams,
        deadline: float | None,
        out: Generation,
        *,
        one_answer: bool,
        on_backend: bool,
    ) -> Iterator[Piece]:
        """Send a buffered request's /completion now; the generator of its pieces, read later.

        With `one_answer` (a buffered request nobody can cancel, without logprobs: a Lambda
        invoke; or any buffered one whose hang-up may run on: `hangup_cancels`) it is one
        non-streamed /completion: llama-server applies the stop strings and the time limit, and
        this process parses one JSON answer instead of one per token. Any
        other buffered request is streamed from the child and handed on as one piece:
        - llama-server checks whether the client of a buffered /completion is still there only
          after a second in which no slot produced anything (one condition variable wakes every
          waiting request), so under any load a hung-up buffered request kept its slot to its
          last token; a streamed one is dropped at its next token, when the write fails (the
          collector's one thread reads them all: `collector.Collector`);
        - a buffered answer's logprobs give a token whose text a stop string held back the text
          '' and the next one both texts; streamed, each token has its own."""
        limit_ms = None
        if one_answer and deadline is not None:
            limit_ms = max(1, int((deadline - time.monotonic()) * 1000))
        body = completion_body(
            prompt, params, stream=not one_answer, time_limit_ms=limit_ms, on_backend=on_backend
        )
        if one_answer:
            send_completion(conn, body)
            return self._read_answer(conn, params, deadline, out)
        reading = StreamReading(params, out.result)  # its clock starts before the send
        send_completion(conn, body)
        return self._collect(conn, reading, deadline, out)

    def _collect(
        self, conn: Connection, reading: StreamReading, deadline: float | None, out: Generation
    ) -> Iterator[Piece]:
        """A buffered answer streamed from the child, read by the collector's thread."""
        if piece := self._collector.read(conn, reading, out, deadline):
            yield piece

    def _read_answer(
        self, conn: Connection, params: SamplingParams, deadline: float | None, out: Generation
    ) -> Iterator[Piece]:
        result = out.result
        try:
            answer = read_answer(conn)
        except (TimeoutError, OSError, AnswerBroken):
            if deadline is not None:
                result.interrupted = True
                return
            raise
        finally:
            conn.close()
        stop_type = answer.get("stop_type")
        predicted = int(answer.get("tokens_predicted", 0))
        result.completion_tokens = predicted - 1 if stop_type == "eos" and predicted else predicted
        result.finish_reason = "stop" if stop_type in ("eos", "word") else "length"
        result.interrupted = stop_type == "limit" and predicted < params.max_tokens
        timings = answer.get("timings") or {}
        if timings.get("prompt_ms") is not None:
            result.time_to_first_token_s = float(timings["prompt_ms"]) / 1000
        if timings.get("predicted_per_second"):
            result.decode_tokens_per_s = float(timings["predicted_per_second"])
        if answer.get("content"):
            yield Piece(answer["content"])

    # ----------------------------------------------------------------- embeddings

    def embed(self, texts: list[str], deadline: Deadline = None) -> tuple[list[list[float]], int]:
        """Not served: llama-server computes embeddings only when started for nothing else."""
        raise InvalidRequest(
            "embeddings are not available with INFERENCE_ENGINE=llama-server; "
            "use INFERENCE_ENGINE=llama for /v1/embeddings",
            param="input",
            code="unsupported",
        )
