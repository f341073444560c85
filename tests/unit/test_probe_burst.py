"""bench.p_probe_burst: requests sent together, probes alternated while they run."""

from __future__ import annotations

import threading

import pytest

from bench import p_probe_burst


def test_each_burst_sends_every_client_at_once_and_probes_meanwhile(monkeypatch):
    monkeypatch.setattr(p_probe_burst, "SETTLE_S", 0.0)
    sent: list[int] = []
    lock = threading.Lock()
    inside = [0]
    most = [0]

    def send() -> None:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        threading.Event().wait(0.05)  # long enough for all of a burst to be in at once
        with lock:
            inside[0] -= 1
            sent.append(1)

    found = p_probe_burst.bursts(
        send, {"a": lambda: 1.0, "b": lambda: 2.0}, clients=8, count=3, probe_s=0.02
    )
    assert len(sent) == 24
    assert most[0] == 8  # a burst's requests all ran together
    assert found["a"] and len(found["a"]) == len(found["b"])  # alternated, in step
    assert set(found["a"]) == {1.0} and set(found["b"]) == {2.0}


def test_a_failed_request_fails_the_run(monkeypatch):
    monkeypatch.setattr(p_probe_burst, "SETTLE_S", 0.0)

    def send() -> None:
        raise RuntimeError("/v1/completions answered 503")

    with pytest.raises(RuntimeError, match="answered 503"):
        p_probe_burst.bursts(send, {"a": lambda: 1.0}, clients=2, count=1, probe_s=0.01)
