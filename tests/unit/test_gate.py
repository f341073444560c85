"""GIVEN the llama-server engine's read-ahead gate WHEN its arrivals come, in any order and from
any thread THEN what it guards runs once, on the last arrival."""

from __future__ import annotations

import threading

from handler.engine.llama_server.engine import Gate


def test_runs_once_on_the_last_arrival():
    ran: list[str] = []
    gate = Gate(2, lambda: ran.append(threading.current_thread().name))
    gate.arrive()
    assert ran == []
    last = threading.Thread(target=gate.arrive, name="last")
    last.start()
    last.join()
    assert ran == ["last"]
    gate.arrive()  # a late extra arrival runs nothing again
    assert ran == ["last"]


def test_concurrent_arrivals_run_it_exactly_once():
    ran: list[int] = []
    gate = Gate(16, lambda: ran.append(1))
    threads = [threading.Thread(target=gate.arrive) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ran == [1]
