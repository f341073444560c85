"""P-upstream: what reading llama-server's answers costs our process, http.client against our own
client (handler/engine/llama_server/upstream.py), on a local server that answers as llama-server
does (a chunked event stream; JSON with a Content-Length and llama-server's headers).

    .venv/bin/python -m bench.p_upstream

CPU time of this process (the server thread's sends included, the same for both clients) per
event of a streamed answer, and per JSON answer (request, headers, body); medians of the rounds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import threading
import time
from collections.abc import Callable

from handler.engine.llama_server.upstream import Connection

EVENT = (
    b"data: "
    + json.dumps(
        {"content": " the", "tokens": [279], "stop": False, "id_slot": 0, "tokens_predicted": 5}
    ).encode()
    + b"\n\n"
)
JSON_BODY = json.dumps({"tokens": list(range(40))}).encode()
HEADERS = (
    b"Server: llama.cpp\r\nKeep-Alive: timeout=5, max=100\r\nAccess-Control-Allow-Origin: \r\n"
)


def serve(listener: socket.socket, answer: Callable[[socket.socket], None], count: int) -> None:
    """Answer `count` connections on `listener`, one after the other."""
    for _ in range(count):
        conn, _ = listener.accept()
        with conn:
            data = b""
            while not data.endswith(b"{}"):  # every request here has the body {}
                data += conn.recv(65536)
            answer(conn)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass


def stream_answer(events: int) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + HEADERS)
        conn.sendall(b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(events):
            conn.sendall(b"%x\r\n%s\r\n" % (len(EVENT), EVENT))
        conn.sendall(b"0\r\n\r\n")

    return answer


def json_answer(conn: socket.socket) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n" + HEADERS
    conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(JSON_BODY) + JSON_BODY)


def run(answer: Callable[[socket.socket], None], read: Callable[[int], int], count: int) -> float:
    """CPU seconds of `count` requests answered by `answer` and read by `read(port)`."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    server = threading.Thread(target=serve, args=(listener, answer, count), daemon=True)
    server.start()
    started = time.process_time()
    for _ in range(count):
        read(port)
    spent = time.process_time() - started
    server.join()
    listener.close()
    return spent


def http_client_lines(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/completion", b"{}", {"Content-Type": "application/json"})
    events = sum(1 for line in conn.getresponse() if line.startswith(b"data: "))
    conn.close()
    return events


def ours_lines(port: int) -> int:
    conn = Connection("127.0.0.1", port, 10)
    conn.request("POST", "/completion", b"{}")
    events = sum(1 for line in conn.response().lines() if line.startswith(b"data: "))
    conn.close()
    return events


def http_client_json(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/tokenize", b"{}", {"Content-Type": "application/json"})
    size = len(conn.getresponse().read())
    conn.close()
    return size


def ours_json(port: int) -> int:
    conn = Connection("127.0.0.1", port, 10)
    conn.request("POST", "/tokenize", b"{}")
    size = len(conn.response().read())
    conn.close()
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=2000, help="per streamed answer")
    parser.add_argument("--answers", type=int, default=500, help="JSON answers per round")
    args = parser.parse_args()
    found: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, reader in (("http.client", http_client_lines), ("ours", ours_lines)):
            spent = run(stream_answer(args.events), reader, 1)
            found.setdefault(f"{name} us per event", []).append(spent / args.events * 1e6)
        for name, reader in (("http.client", http_client_json), ("ours", ours_json)):
            spent = run(json_answer, reader, args.answers)
            found.setdefault(f"{name} us per JSON answer", []).append(spent / args.answers * 1e6)
    medians = {name: round(statistics.median(values), 1) for name, values in found.items()}
    print(json.dumps(medians))
    for unit in ("event", "JSON answer"):
        ratio = medians[f"ours us per {unit}"] / medians[f"http.client us per {unit}"]
        print(f"per {unit}: ours / http.client = {ratio:.2f}x")


if __name__ == "__main__":
    main()
