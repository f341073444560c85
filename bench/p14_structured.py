"""P14: what constrained decoding costs, against llama.cpp's llama-server (--jinja) in the same run.

A. Decode tokens/s of the same streamed chat request, plain and under a JSON-schema grammar
   (a long string field: the grammar is active on every token; and an array of 30 small objects:
   structure on every few tokens), 128 tokens, temperature 0. Rates are taken client-side from
   the stream ((completion_tokens - 1) / (last token - first token)) for both servers alike.
B. Time to the first generated delta of a tools request (tool_choice required, one function:
   the first fragment of the arguments; its name is known before anything is generated) against
   the plain request's first content delta.
C. Grammar compile time: JSON Schema -> GBNF (`schema_grammar`, uncached / cached) and
   llama.cpp's parse of that GBNF (first use) against the clone a cached use costs.

Ours and llama-server run one at a time on the same threads, rounds alternating; every request
opens with a fresh system line, so no prompt is served from either server's KV cache.

    .venv/bin/python -m bench.p14_structured --rounds 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    MODEL,
    N_CTX,
    OUT,
    THREADS,
    fmt,
    free_port,
    http_ok,
    llama_server_command,
    median,
    poll,
    serve_command,
    spawn,
)

MAX_TOKENS = 128
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to sail."}]
CITIES = [{"role": "user", "content": "List thirty cities of Europe as JSON."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
STRING_SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
    "additionalProperties": False,
}
ARRAY_SCHEMA = {
    "type": "object",
    "properties": {
        "cities": {
            "type": "array",
            "minItems": 30,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "population": {"type": "integer"},
                    "capital": {"type": "boolean"},
                },
                "required": ["name", "population", "capital"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["cities"],
    "additionalProperties": False,
}


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


REQUESTS: dict[str, dict[str, Any]] = {
    "plain": {"messages": STORY},
    "schema-string": {"messages": STORY, "response_format": json_schema(STRING_SCHEMA)},
    "schema-array": {"messages": CITIES, "response_format": json_schema(ARRAY_SCHEMA)},
    "tools": {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    },
}


def streamed(port: int, body: dict[str, Any]) -> dict[str, float]:
    """One streamed chat request: time to the first delta, decode rate, tokens."""
    # A fresh system line per request: neither server reuses an earlier prompt's KV cache.
    nonce = {"role": "system", "content": f"Session {uuid.uuid4().hex}."}
    body = {
        **body,
        "messages": [nonce, *body["messages"]],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    started = time.perf_counter()
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"}
    )
    response = conn.getresponse()
    first = last = None
    tokens = 0
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            arguments = "".join(
                (call.get("function") or {}).get("arguments") or ""
                for call in delta.get("tool_calls") or []
            )
            if delta.get("content") or arguments:  # generated text (a call's name may be known)
                now = time.perf_counter()
                first = first or now
                last = now
    conn.close()
    assert first is not None and last is not None, f"no tokens from {body}"
    rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")
    return {"first_delta_s": first - started, "tokens_per_s": rate, "tokens": tokens}


def measure(cmd: list[str], env: dict[str, str], port: int, log: Path) -> dict[str, Any]:
    with log.open("ab") as sink, spawn(cmd, env, log=sink) as proc:
        poll(
            lambda: (
                http_ok(f"http://127.0.0.1:{port}/health")
                or http_ok(f"http://127.0.0.1:{port}/readyz")
            ),
            timeout_s=120,
            interval_s=0.05,
            proc=proc,
        )
        streamed(port, REQUESTS["plain"])  # warm: both servers' first request pays set-up
        return {name: streamed(port, body) for name, body in REQUESTS.items()}


def compile_times(rounds: int) -> dict[str, float]:
    """JSON Schema -> GBNF uncached and cached; llama.cpp's parse against a cached clone."""
    from handler.engine import grammar
    from handler.engine.in_process import bindings

    bindings.init_backend(verbose=False)
    model = bindings.Model(str(MODEL), 0)
    lib = bindings.bindings()
    figures: dict[str, list[float]] = {k: [] for k in ("gbnf", "gbnf_cached", "parse", "clone")}
    for _ in range(rounds):
        grammar._cached_grammar.cache_clear()
        bindings._grammars.clear()
        t0 = time.perf_counter()
        text = grammar.schema_grammar(ARRAY_SCHEMA)
        t1 = time.perf_counter()
        grammar.schema_grammar(ARRAY_SCHEMA)
        t2 = time.perf_counter()
        first = bindings._grammar(model, text)
        t3 = time.perf_counter()
        second = bindings._grammar(model, text)
        t4 = time.perf_counter()
        lib.llama_sampler_free(first)
        lib.llama_sampler_free(second)
        for key, value in zip(figures, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            figures[key].append(value)
    return {k: median(v) for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / "p14_servers.log"
    log.write_bytes(b"")
    results: dict[str, list[dict[str, Any]]] = {"ours": [], "llama-server": []}
    for _ in range(args.rounds):
        for name, rounds in results.items():
            port = free_port()
            if name == "ours":
                cmd = serve_command(port)
                env = {"MODEL_URI": str(MODEL), "N_CTX": str(N_CTX), "N_THREADS": str(THREADS)}
            else:
                cmd, env = [*llama_server_command(port), "--jinja"], {}
            rounds.append(measure(cmd, env, port, log))
    summary = {
        server: {
            request: {
                key: median([r[request][key] for r in rounds])
                for key in ("first_delta_s", "tokens_per_s", "tokens")
            }
            for request in REQUESTS
        }
        for server, rounds in results.items()
    }
    summary["compile"] = compile_times(max(5, args.rounds))
    (OUT / "p14_structured.json").write_text(json.dumps({"rounds": results, **summary}, indent=2))
    report(summary)


def report(summary: dict[str, Any]) -> None:
    ours, anchor = summary["ours"], summary["llama-server"]
    print(
        f"{'request':15} {'ours tok/s':>10} {'ls tok/s':>9} {'ours/ls':>8} "
        f"{'ours 1st':>9} {'ls 1st':>8} {'tokens':>9}"
    )
    for request in REQUESTS:
        o, a = ours[request], anchor[request]
        print(
            f"{request:15} {fmt(o['tokens_per_s'], 1):>10} {fmt(a['tokens_per_s'], 1):>9} "
            f"{fmt(o['tokens_per_s'] / a['tokens_per_s'], 2):>8} {fmt(o['first_delta_s']):>9} "
            f"{fmt(a['first_delta_s']):>8} {int(o['tokens']):>4}/{int(a['tokens']):<4}"
        )
    for server, figures in (("ours", ours), ("llama-server", anchor)):
        plain_rate, plain_first = (
            figures["plain"]["tokens_per_s"],
            figures["plain"]["first_delta_s"],
        )
        string = figures["schema-string"]["tokens_per_s"] / plain_rate
        array = figures["schema-array"]["tokens_per_s"] / plain_rate
        tools = figures["tools"]["first_delta_s"] / plain_first
        print(
            f"{server}: schema-string/plain {fmt(string, 2)}x, schema-array/plain "
            f"{fmt(array, 2)}x, tools first delta / plain {fmt(tools, 2)}x"
        )
    c = summary["compile"]
    print(
        f"compile: GBNF {c['gbnf'] * 1e3:.2f} ms (cached {c['gbnf_cached'] * 1e6:.1f} us), "
        f"llama.cpp parse {c['parse'] * 1e3:.2f} ms (cached clone {c['clone'] * 1e3:.3f} ms)"
    )


if __name__ == "__main__":
    main()
