"""A bounded load runner: replays events/load/ against the HTTP server or the Lambda emulator.

    python -m bench.load --target server   [--requests 60] [--concurrency 4] [--url URL]
    python -m bench.load --target emulator [--requests 30] [--stream-mode]

A closed loop: `--concurrency` threads each send the next event (in file order, cycling) as soon
as their previous answer is complete, until `--requests` are done or `--max-duration-s` passes.
`--warmup` requests go first and are not counted. Without `--url` the target is started here on
127.0.0.1 (the server: `python -m handler serve`; the emulator: the real RIE running awslambdaric,
or our streaming loop with `--stream-mode`) and stopped at the end.

The report (JSON on stdout, and `--out`): QPS, latency percentiles (overall and by prompt size),
time to first token for streamed requests (server only: the emulator hands a stream over whole),
completion tokens per second, errors by kind, and the target's RSS.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import MODEL, RIE, ROOT, free_port, poll, spawn

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


@contextmanager
def started_server(env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """`python -m handler serve` on a free port, ready; yields (base URL, pid)."""
    port = free_port()
    cmd = [sys.executable, "-m", "handler", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with spawn(cmd, target_env(env)) as proc:
        base = f"http://127.0.0.1:{port}"
        poll(lambda: _ready(proc, f"{base}/readyz"), 120, 0.05)
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
    if stream_mode:
        runtime = [sys.executable, "-m", "handler", "lambda"]
        env = {"INVOKE_MODE": "RESPONSE_STREAM", **env}
    else:
        runtime = [sys.executable, "-m", "awslambdaric", "handler.lambda_function.handler"]
    cmd = [
        str(RIE),
        "--runtime-interface-emulator-address",
        f"127.0.0.1:{port}",
        "--runtime-api-address",
        f"127.0.0.1:{api_port}",
        *runtime,
    ]
    with spawn(cmd, target_env(env)) as proc:
        poll(lambda: _ready(proc, f"http://127.0.0.1:{port}/"), 60, 0.05)
        yield f"http://127.0.0.1:{port}/2015-03-31/functions/function/invocations", proc.pid


def target_env(env: dict[str, str]) -> dict[str, str]:
    """The target's environment: the default model unless MODEL_URI is given."""
    return {"MODEL_URI": str(MODEL), **env}


def _ready(proc: Any, url: str) -> bool:
    """True once `url` answers 200 (the emulator: anything); fail at once if the target died
    or its model failed to load."""
    if proc.poll() is not None:
        raise RuntimeError(f"the target exited with status {proc.returncode}")
    try:
        response = httpx.get(url, timeout=1)
    except httpx.TransportError:
        return False
    if url.endswith("/readyz") and response.status_code != 200:
        if response.json().get("state") == "failed":
            raise RuntimeError(f"the model failed to load: {response.json().get('reason')}")
        return False
    return True


# ------------------------------------------------------------------ memory


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (VmRSS), in MB."""
    total_kb, stack = 0, [pid]
    while stack:
        current = stack.pop()
        proc = Path(f"/proc/{current}")
        try:
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
            for task in (proc / "task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total_kb / 1024


def cpu_stall_us() -> int | None:
    """Microseconds some task waited for a CPU, machine-wide (PSI); None without PSI."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(first.rsplit("total=", 1)[1])


def cpu_pressure(stall_before: int | None, wall_s: float) -> float | None:
    """Share of `wall_s` in which some task was waiting for a CPU (a busy machine skews times)."""
    stall_after = cpu_stall_us()
    if stall_before is None or stall_after is None or not wall_s:
        return None
    return round((stall_after - stall_before) / (wall_s * 1e6), 3)


# ------------------------------------------------------------------ running and reporting


def run(
    target: ServerTarget | EmulatorTarget,
    events: list[LoadEvent],
    requests: int,
    concurrency: int,
    *,
    max_duration_s: float,
    on_done: Callable[[int, Outcome], None] | None = None,
) -> tuple[list[Outcome], float]:
    """Send `requests` events (cycling) from `concurrency` threads; return outcomes, wall time."""
    counter = itertools.count()
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    started = time.perf_counter()
    stop_at = started + max_duration_s

    def worker() -> None:
        while True:
            i = next(counter)
            if i >= requests or time.perf_counter() >= stop_at:
                return
            item = events[i % len(events)]
            outcome = send_safely(target, item)
            with lock:
                outcomes.append(outcome)
            if on_done is not None:
                on_done(i, outcome)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, time.perf_counter() - started


def send_safely(target: ServerTarget | EmulatorTarget, item: LoadEvent) -> Outcome:
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


def percentiles(values: list[float]) -> dict[str, float] | None:
    """p50/p95/p99 (nearest rank), mean and max, rounded to the millisecond."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]

    summary = {
        "p50": rank(0.50),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "mean": statistics.fmean(ordered),
        "max": ordered[-1],
    }
    return {k: round(v, 4) for k, v in summary.items()}


def report(
    target: ServerTarget | EmulatorTarget,
    outcomes: list[Outcome],
    wall_s: float,
    *,
    concurrency: int,
    rss: dict[str, float] | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The load report."""
    ok = [o for o in outcomes if o.kind == "ok"]
    errors = Counter(o.kind for o in outcomes if o.kind != "ok")
    streamed_ok = [o for o in ok if o.stream and o.ttft_s is not None]
    tokens = sum(o.completion_tokens for o in ok)
    by_size = {}
    for size in sorted({o.size for o in outcomes}):
        done = [o.latency_s for o in ok if o.size == size]
        by_size[size] = {"requests": sum(o.size == size for o in outcomes), "latency_s": None}
        by_size[size]["latency_s"] = percentiles(done)
    return {
        "target": target.name,
        "url": target.base_url,
        "requests": len(outcomes),
        "concurrency": concurrency,
        "streamed": sum(o.stream for o in outcomes),
        "duration_s": round(wall_s, 3),
        "qps": round(len(outcomes) / wall_s, 3) if wall_s else 0.0,
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "error_rate": round(sum(errors.values()) / len(outcomes), 4) if outcomes else 0.0,
        "latency_s": percentiles([o.latency_s for o in ok]),
        "ttft_s": percentiles([o.ttft_s for o in streamed_ok]) if target.ttft_observable else None,
        "completion_tokens": tokens,
        "completion_tokens_per_s": round(tokens / wall_s, 2) if wall_s else 0.0,
        "by_size": by_size,
        "rss_mb": rss,
        **extra,
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A few lines for people (the JSON has everything)."""
    lat, ttft = result["latency_s"] or {}, result["ttft_s"] or {}
    lines = [
        f"{result['target']}: {result['requests']} requests ({result['streamed']} streamed), "
        f"concurrency {result['concurrency']}, {result['duration_s']:.1f} s, "
        f"{result['qps']:.2f} req/s, {result['completion_tokens_per_s']:.1f} tokens/s",
        f"  latency p50/p95/p99: {lat.get('p50')}/{lat.get('p95')}/{lat.get('p99')} s",
        f"  errors: {result['errors'] or 'none'} (rate {result['error_rate']:.2%})",
    ]
    if ttft:
        lines.insert(2, f"  TTFT p50/p95/p99: {ttft['p50']}/{ttft['p95']}/{ttft['p99']} s")
    if result["rss_mb"]:
        lines.append(f"  target RSS MB: {result['rss_mb']}")
    if result.get("cpu_pressure") is not None:
        lines.append(f"  CPU pressure (time a task waited for a CPU): {result['cpu_pressure']}")
    return lines


def parse_env(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE pairs from --env."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--target", choices=("server", "emulator"), default="server")
    parser.add_argument("--url", help="an already running target (server base URL, or invoke URL)")
    parser.add_argument("--events", type=Path, default=EVENTS_DIR, help="folder of events")
    parser.add_argument("--requests", type=int, default=60, help="requests counted")
    parser.add_argument(
        "--concurrency", type=int, help="requests in flight (default: server 4, emulator 1)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="uncounted first requests")
    parser.add_argument("--max-duration-s", type=float, default=300.0, help="stop sending after")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    parser.add_argument("--stream-mode", action="store_true", help="emulator: our streaming loop")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the target")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)

    events = [LoadEvent.read(p) for p in sorted(args.events.glob("*.json"))]
    if not events:
        raise SystemExit(f"no events in {args.events}: run python -m bench.load_events")
    env = parse_env(args.env)
    warmup = len(events) if args.warmup is None else args.warmup
    if args.concurrency is None:
        args.concurrency = 4 if args.target == "server" else 1
    if args.target == "emulator" and args.concurrency != 1:
        # The RIE models one execution environment: a second invoke in flight makes it panic
        # (nil pointer dereference) and drop both. Lambda would start another environment.
        parser.error("--target emulator takes --concurrency 1 (the RIE runs one invoke at a time)")

    with _target(args, env) as (target, pid):
        if warmup:
            run(target, events, warmup, 1, max_duration_s=args.max_duration_s)
        rss_start = tree_rss_mb(pid) if pid else None
        stall = cpu_stall_us()
        outcomes, wall_s = run(
            target, events, args.requests, args.concurrency, max_duration_s=args.max_duration_s
        )
        pressure = cpu_pressure(stall, wall_s)
        rss = {"start": round(rss_start, 1), "end": round(tree_rss_mb(pid), 1)} if pid else None

    extra = {
        "cpu_pressure": pressure,
        "warmup": warmup,
        "stream_mode": args.stream_mode if args.target == "emulator" else None,
        "env": env,
        "events": [e.name for e in events],
        "command": "python -m bench.load " + " ".join(argv or sys.argv[1:]),
    }
    result = report(target, outcomes, wall_s, concurrency=args.concurrency, rss=rss, extra=extra)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    print("\n".join(summary_lines(result)), file=sys.stderr)
    return 0


@contextmanager
def _target(
    args: argparse.Namespace, env: dict[str, str]
) -> Iterator[tuple[ServerTarget | EmulatorTarget, int | None]]:
    if args.target == "server":
        if args.url:
            yield ServerTarget(args.url, args.timeout_s), None
            return
        with started_server(env) as (base, pid):
            yield ServerTarget(base, args.timeout_s), pid
        return
    if args.url:
        yield EmulatorTarget(args.url, args.timeout_s), None
        return
    with started_emulator(env, args.stream_mode, args.timeout_s) as (url, pid):
        yield EmulatorTarget(url, args.timeout_s), pid


if __name__ == "__main__":
    raise SystemExit(main())
