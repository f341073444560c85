"""P6's steady load: closed loops per concurrency level, streamed and buffered, against an HTTP
server (ours or llama-server alone) or our Runtime API loop, with health probes.

A level is N clients, each sending its next request as soon as its previous answer is complete,
for a warm-up and then a measured window (not one burst: a burst ends with a tail where fewer
and fewer requests run). The aggregate decode rate counts, of every request that overlaps the
window, the share of its tokens that falls inside it (its tokens spread evenly over its time).
Streamed requests give the time to first token. During the window of an HTTP target, its health
paths (ours: /healthz and /readyz; llama-server alone: /health, the same probe's reference) are
probed every PROBE_INTERVAL_S from a process of their own (in this one they would wait for the
GIL behind the load's clients, and measure that) and their latencies reported; for ours, also how
late its event loop woke in the window (`coldstart_event_loop_lag_seconds` of /metrics, read
before and after): a slow probe with a punctual loop waited somewhere else.
"""

from __future__ import annotations

import bisect
import http.client
import json
import multiprocessing
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.common import percentiles
from bench.runtime_api_server import RuntimeAPIServer

# Fifty probes a second, alternating /healthz and /readyz: 200 of each per 8 s window, so that
# p99 is not simply the slowest one (as it was at ten a second); as many again on the kept-open
# connection. Together about 3% of a core of our process on this repository's machine kind (a
# fresh /healthz cost it 200 us of CPU, a fresh /readyz 585 us, in 2,000 sequential probes).
PROBE_INTERVAL_S = 0.02
OUR_PROBES = ("healthz", "readyz")
PROMPT = "Once upon a time"


@dataclass
class Sample:
    """One request as a client saw it."""

    started: float
    ended: float
    tokens: int = 0
    ttft_s: float | None = None
    error: str | None = None


Send = Callable[[], Sample]


def request_body(max_tokens: int) -> dict[str, Any]:
    """The body every target gets (ignore_eos: llama-server honours it; ours has no such field,
    and a synthetic model's random weights rarely end a text)."""
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


# ----------------------------------------------------------------------------- the loop


def closed_loop(
    send: Send,
    clients: int,
    *,
    warmup_s: float,
    window_s: float,
    probe_port: int | None = None,
    probe_paths: tuple[str, ...] = OUR_PROBES,
    health_port: int | None = None,
) -> dict[str, Any]:
    """`clients` clients sending back to back through the warm-up and the window; the figures
    (with `probe_port`, the latencies of `probe_paths` there under the load; with `health_port`,
    of /healthz on our HEALTH_PORT too, as `port_healthz*`)."""
    samples: list[Sample] = []
    lock = threading.Lock()
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + window_s)

    def client() -> None:
        while time.perf_counter() < window[1]:
            sample = send()
            with lock:
                samples.append(sample)
        done = getattr(send, "done", None)
        if done is not None:
            done()  # a sender's connection kept for this client

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    prober = Prober(probe_port, window, probe_paths) if probe_port is not None else None
    health = Prober(health_port, window, ("healthz",)) if health_port is not None else None
    for thread in threads:
        thread.start()
    lag_before = loop_lag(probe_port, window[0]) if probe_port is not None else None
    lag_after = loop_lag(probe_port, window[1]) if probe_port is not None else None
    for thread in threads:
        thread.join()
    probes = prober.result() if prober is not None else {}
    if health is not None:
        probes.update({f"port_{name}": values for name, values in health.result().items()})
    found = summarize(samples, window, clients, probes)
    if lag_before is not None and lag_after is not None:
        found["loop_lag"] = lag_in_window(lag_before, lag_after)
    return found


LAG_METRIC = "coldstart_event_loop_lag_seconds_bucket"


def loop_lag(port: int, at: float) -> dict[str, int] | None:
    """At time `at`, our server's loop-lag histogram (cumulative count per bound); None when
    the server has none (llama-server alone)."""
    time.sleep(max(0.0, at - time.perf_counter()))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode(errors="replace")
    except OSError:
        return None
    finally:
        conn.close()
    if response.status != 200:
        return None
    found = {}
    for line in text.splitlines():
        if line.startswith(LAG_METRIC):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            found[bound] = int(float(line.rsplit(" ", 1)[1]))
    return found or None


def lag_in_window(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The window's wake-ups: how many in all, and how many later than 5, 10 and 25 ms."""
    total = after["+Inf"] - before["+Inf"]

    def later_than(bound: str) -> int:
        return total - (after[bound] - before[bound])

    return {"wakeups": total, **{f"over_{b}ms": later_than(repr(b / 1e3)) for b in (5, 10, 25)}}


def summarize(
    samples: list[Sample],
    window: tuple[float, float],
    clients: int,
    probes: dict[str, list[float]],
) -> dict[str, Any]:
    """Aggregate tokens/s in the window, TTFT and latency of the requests begun in it, errors."""
    ok = [s for s in samples if s.error is None]
    inside = [s for s in ok if s.started >= window[0]]
    errors: dict[str, int] = {}
    for s in samples:
        if s.error is not None:
            errors[s.error] = errors.get(s.error, 0) + 1
    ttfts = [s.ttft_s for s in inside if s.ttft_s is not None]
    starts = {name[:-3]: probes.pop(name) for name in list(probes) if name.endswith("_at")}
    company = {
        f"{name}_company": probe_company(samples, at, probes[name])
        for name, at in starts.items()
        if name in probes
    }
    return {
        "clients": clients,
        "window_s": round(window[1] - window[0], 3),
        "tokens_per_s": round(tokens_in(ok, window) / (window[1] - window[0]), 1),
        "requests": len(samples),
        "errors": errors,
        "ttft_s": percentiles(ttfts) if ttfts else None,
        "latency_s": percentiles([s.ended - s.started for s in inside]) if inside else None,
        **{f"{name}_ms": ms_percentiles(values) for name, values in probes.items() if values},
        **company,
    }


SLOW_PROBE_S = 0.010  # the issue's /healthz target
COMPANY_BEFORE_S = 0.050


def probe_company(
    samples: list[Sample], starts: list[float], latencies: list[float]
) -> dict[str, float | int]:
    """How many of the load's requests started while each probe waited (from COMPANY_BEFORE_S
    before it was sent until it was answered), on average for the probes slower than
    SLOW_PROBE_S and for the others: a slow probe with many more for company waited behind
    requests arriving together (the closed loop's clients finish and reconnect in step)."""
    begun = sorted(s.started for s in samples)

    def company(start: float, latency: float) -> int:
        return bisect.bisect_right(begun, start + latency) - bisect.bisect_left(
            begun, start - COMPANY_BEFORE_S
        )

    slow = [company(a, d) for a, d in zip(starts, latencies, strict=True) if d > SLOW_PROBE_S]
    fast = [company(a, d) for a, d in zip(starts, latencies, strict=True) if d <= SLOW_PROBE_S]
    return {
        "slow": len(slow),
        "slow_company": round(statistics.fmean(slow), 1) if slow else 0,
        "fast": len(fast),
        "fast_company": round(statistics.fmean(fast), 1) if fast else 0,
    }


def tokens_in(samples: list[Sample], window: tuple[float, float]) -> float:
    """Tokens generated inside the window, each request's spread evenly over its duration."""
    total = 0.0
    for s in samples:
        overlap = min(s.ended, window[1]) - max(s.started, window[0])
        if overlap > 0 and s.ended > s.started:
            total += s.tokens * overlap / (s.ended - s.started)
    return total


def ms_percentiles(values_s: list[float]) -> dict[str, float] | None:
    """Percentiles of durations in seconds, in milliseconds."""
    found = percentiles(values_s)
    return {k: round(v * 1000, 2) for k, v in found.items()} if found else None


class Prober:
    """`probe` in a process of its own (spawned: this one runs threads), started now."""

    def __init__(self, port: int, window: tuple[float, float], paths: tuple[str, ...]) -> None:
        context = multiprocessing.get_context("spawn")
        self._results: Any = context.Queue()
        self._process = context.Process(
            target=probe_into, args=(port, window, paths, self._results), daemon=True
        )
        self._process.start()

    def result(self) -> dict[str, list[float]]:
        """The latencies, once the window is over."""
        try:
            found: dict[str, list[float]] = self._results.get(timeout=60)
            return found
        finally:
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()


def probe_into(
    port: int, window: tuple[float, float], paths: tuple[str, ...], results: Any
) -> None:
    """The prober process: probe through the window, put the latencies on `results`."""
    out: dict[str, list[float]] = {path: [] for path in paths}
    probe(port, window, out)
    results.put(out)


def probe(port: int, window: tuple[float, float], out: dict[str, list[float]]) -> None:
    """Time GET of each path of `out`, in turn, every PROBE_INTERVAL_S inside the window, on a
    fresh connection each time as a kubelet does (`<path>`; its handshake alone as
    `<path>_connect`), and on a thread of its own, half a period apart, on one connection kept
    open (`<path>_kept`): no new connection for the server to take in."""
    paths = list(out)
    found: dict[str, list[float]] = {}
    kept = threading.Thread(target=probe_kept, args=(port, window, paths, found), daemon=True)
    kept.start()
    while time.perf_counter() < window[0]:
        time.sleep(PROBE_INTERVAL_S)
    i = 0
    while time.perf_counter() < window[1]:
        path = paths[i % len(paths)]
        i += 1
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        started = time.perf_counter()
        try:
            conn.connect()  # the kernel's handshake: no server code runs in it
            connected = time.perf_counter()
            conn.request("GET", f"/{path}")
            conn.getresponse().read()
            out[path].append(time.perf_counter() - started)
            out.setdefault(f"{path}_connect", []).append(connected - started)
            out.setdefault(f"{path}_at", []).append(started)  # perf_counter: one clock for all
        except OSError:
            pass  # a probe that fails is absent from the figures, as it would be from a kubelet's
        finally:
            conn.close()
        time.sleep(PROBE_INTERVAL_S)
    kept.join()
    out.update(found)


def probe_kept(
    port: int, window: tuple[float, float], paths: list[str], out: dict[str, list[float]]
) -> None:
    """`probe`'s kept-open connection, starting half a period after it."""
    time.sleep(max(0.0, window[0] - time.perf_counter()) + PROBE_INTERVAL_S / 2)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    i = 0
    while time.perf_counter() < window[1]:
        path = paths[i % len(paths)]
        i += 1
        started = time.perf_counter()
        try:
            conn.request("GET", f"/{path}")
            conn.getresponse().read()
            out.setdefault(f"{path}_kept", []).append(time.perf_counter() - started)
        except (OSError, http.client.HTTPException):
            conn.close()  # reconnects on the next request
        time.sleep(PROBE_INTERVAL_S)
    conn.close()


# ----------------------------------------------------------------------------- HTTP targets


class HTTPSender:
    """A client of POST /v1/completions, streamed (SSE with usage) or buffered: a new connection
    per request, or with `keep_alive` one per client thread kept open between its requests, as
    the `openai` client's pool does (a kept connection the server has closed meanwhile is opened
    again and the request sent once more, as such a pool does; llama-server closes one after a
    streamed answer). `done()`, on a client thread, closes that thread's connection: an idle
    kept connection holds one of llama-server's HTTP threads until its keep-alive timeout."""

    def __init__(
        self, port: int, body: dict[str, Any], stream: bool, keep_alive: bool = False
    ) -> None:
        payload = {**body, "stream": stream}
        if stream:
            payload["stream_options"] = {"include_usage": True}
        self.request = json.dumps(payload)
        self.port, self.stream, self.keep_alive = port, stream, keep_alive
        self._kept = threading.local()

    def __call__(self) -> Sample:
        started = time.perf_counter()
        conn: http.client.HTTPConnection | None = getattr(self._kept, "conn", None)
        reused = conn is not None
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        failed = True
        try:
            try:
                response = self._post(conn)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                conn.close()  # closed by the server while idle: once more, on a new one
                response = self._post(conn)
            if response.status != 200:
                response.read()
                return Sample(started, time.perf_counter(), error=f"http_{response.status}")
            if self.stream:
                sample = read_sse(response, started)
            else:
                usage = json.loads(response.read()).get("usage") or {}
                tokens = int(usage.get("completion_tokens", 0))
                sample = Sample(started, time.perf_counter(), tokens)
            failed = False
            return sample
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return Sample(started, time.perf_counter(), error=type(exc).__name__)
        finally:
            if failed or not self.keep_alive:
                conn.close()
                self._kept.conn = None
            else:
                self._kept.conn = conn

    def _post(self, conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        conn.request("POST", "/v1/completions", self.request, {"Content-Type": "application/json"})
        return conn.getresponse()

    def done(self) -> None:
        """Close the calling thread's kept connection, if any."""
        conn = getattr(self._kept, "conn", None)
        if conn is not None:
            conn.close()
            self._kept.conn = None


def read_sse(lines: Any, started: float) -> Sample:
    """A streamed completion: first text chunk, tokens from the usage chunk (else chunks)."""
    first: float | None = None
    chunks = 0
    usage: dict[str, Any] = {}
    for line in lines:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            chunks += 1
            first = first or time.perf_counter()
    tokens = int(usage.get("completion_tokens") or chunks)
    ttft = None if first is None else first - started
    return Sample(started, time.perf_counter(), tokens, ttft)


# ----------------------------------------------------------------------------- Runtime API loop


def roomy(server: RuntimeAPIServer) -> RuntimeAPIServer:
    """The server with a listen backlog for hundreds of workers: each streamed response is a new
    connection, and a full backlog (http.server's default is 5) drops SYNs that come back only
    after a second, which would be measured as our latency."""
    server._httpd.socket.listen(1024)
    return server


def runtime_sender(server: RuntimeAPIServer, url_event: dict[str, Any], stream: bool) -> Send:
    """A client of our Runtime API loop: a function URL event streamed (INVOKE_MODE
    RESPONSE_STREAM), or a direct invoke (the OpenAI body as the payload) answered buffered."""

    def send() -> Sample:
        started = time.perf_counter()
        try:
            if stream:
                result = server.result(server.invoke(url_event))
                _, body = result.split_prelude()
                sample = read_sse(body.split(b"\n\n"), started)
                first = next((t for t, data in result.chunks if b'"text":"' in data), None)
                sample.ttft_s = None if first is None else first - started
                sample.ended = result.done_at
                return sample
            payload = json.loads(url_event["body"])
            result = server.result(server.invoke({**payload, "stream": False}))
            answer = result.json()
            if "error" in answer or result.kind != "response":
                return Sample(started, result.done_at, error="invoke_error")
            tokens = int(answer["usage"]["completion_tokens"])
            return Sample(started, result.done_at, tokens)
        except (TimeoutError, ValueError, KeyError, AssertionError) as exc:
            return Sample(started, time.perf_counter(), error=type(exc).__name__)

    return send


def function_url_event(template: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """A function URL event (events/function-url-chat.json's shape) for POST /v1/completions."""
    event = json.loads(json.dumps(template))
    event["rawPath"] = "/v1/completions"
    event["requestContext"]["http"]["path"] = "/v1/completions"
    event["body"] = json.dumps({**body, "stream": True})
    event["isBase64Encoded"] = False
    return event
