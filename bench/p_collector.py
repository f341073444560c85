"""P-collector: what reading N buffered answers streamed from llama-server costs our process, the
collector's one thread (handler/engine/llama_server/collector.py) against a thread per answer
(what the engine did first: each request's own thread reading its stream), on a local server
that answers as llama-server does: one token to every connection each decode step.

    .venv/bin/python -m bench.p_collector

Our CPU time (this process's, less the server thread's own) per event; rounds alternate the two
readers, medians of the rounds. A reader thread per answer wakes once per token; the collector
wakes once per pass and reads every socket that has something.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import threading
import time
from collections.abc import Callable

from handler.engine.generation import Generation, SamplingParams
from handler.engine.llama_server.collector import Collector
from handler.engine.llama_server.process import read_events
from handler.engine.llama_server.reading import StreamReading
from handler.engine.llama_server.upstream import Connection

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def event(i: int, stop: bool = False) -> bytes:
    """One chunk of a streamed /completion, as llama-server writes it."""
    fields = {"index": 0, "content": "" if stop else f" t{i}", "tokens": [i], "stop": stop}
    fields |= {"id_slot": 0, "tokens_predicted": i + 1, "tokens_evaluated": 8}
    if stop:
        fields["stop_type"] = "limit"
    data = b"data: " + json.dumps(fields).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


class StepServer:
    """Waits for `answers` requests, then sends each a token every `step_s`, `tokens` times,
    and the last chunk; `cpu_s` is its own thread's CPU time."""

    def __init__(self, answers: int, tokens: int, step_s: float) -> None:
        self.answers, self.tokens, self.step_s = answers, tokens, step_s
        self.cpu_s = 0.0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(answers)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        started = time.thread_time()
        conns = []
        while len(conns) < self.answers:
            conn, _ = self.listener.accept()
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conns.append(conn)
        for conn in conns:
            conn.sendall(HEAD)
        for i in range(self.tokens):
            for conn in conns:
                conn.sendall(event(i))
            time.sleep(self.step_s)
        for conn in conns:
            conn.sendall(event(self.tokens, stop=True) + b"0\r\n\r\n")
            conn.close()
        self.listener.close()
        self.cpu_s = time.thread_time() - started


def by_thread(conn: Connection, reading: StreamReading, _: Generation) -> str:
    """A thread per answer: its events read where they come (the engine's `_read_stream`)."""
    texts = []
    for chunk in read_events(conn):
        if piece := reading.add(chunk):
            texts.append(piece.text)
        if reading.done:
            break
    conn.close()
    return "".join(texts)


def by_collector(collector: Collector) -> Callable[[Connection, StreamReading, Generation], str]:
    def read(conn: Connection, reading: StreamReading, generation: Generation) -> str:
        piece = collector.read(conn, reading, generation, None)
        return piece.text if piece else ""

    return read


def round_us_per_event(
    read: Callable[[Connection, StreamReading, Generation], str], answers: int, tokens: int,
    step_s: float,
) -> float:  # fmt: skip
    """Our CPU per event for `answers` answers read at once."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    server = StepServer(answers, tokens, step_s)
    texts: list[str] = []

    def reader() -> None:
        conn = Connection("127.0.0.1", server.port, 60)
        conn.request("POST", "/completion", b"{}")
        generation = Generation()
        reading = StreamReading(SamplingParams(max_tokens=tokens + 1), generation.result)
        texts.append(read(conn, reading, generation))

    threads = [threading.Thread(target=reader) for _ in range(answers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server.thread.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    want = "".join(f" t{i}" for i in range(tokens))
    if texts != [want] * answers:
        raise RuntimeError("an answer came back wrong")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime - server.cpu_s
    return cpu * 1e6 / (answers * tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=10.0, help="one decode step")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    collector = Collector(idle_s=60)
    for level in args.levels:
        found: dict[str, list[float]] = {"thread": [], "collector": []}
        for _ in range(args.rounds):
            for name, read in (("thread", by_thread), ("collector", by_collector(collector))):
                found[name].append(round_us_per_event(read, level, args.tokens, args.step_ms / 1e3))
        thread, ours = (statistics.median(found[k]) for k in ("thread", "collector"))
        print(
            f"{level:3d} answers  us CPU per event: thread per answer {thread:6.1f}  "
            f"collector {ours:6.1f}  ratio {ours / thread:.2f}x  "
            f"({', '.join(f'{v:.1f}' for v in found['collector'])} against "
            f"{', '.join(f'{v:.1f}' for v in found['thread'])})",
            flush=True,
        )


if __name__ == "__main__":
    main()
