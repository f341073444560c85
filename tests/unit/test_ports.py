"""handler.ports: ports for the servers we start, drawn where no client connection can take them."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from handler import ports


def test_ports_lie_below_the_ephemeral_range_and_are_never_handed_out_twice():
    floor = ports._ephemeral_floor()
    drawn = [ports.free_port() for _ in range(50)]
    assert len(set(drawn)) == len(drawn)
    assert all(max(1024, floor - ports.BELOW_EPHEMERAL) <= port < floor for port in drawn)


def test_a_port_in_use_is_not_handed_out(monkeypatch):
    with socket.socket() as busy:
        busy.bind((ports.HOST, 0))
        taken = busy.getsockname()[1]
        # A range of exactly one port, which is taken: no port can be had.
        monkeypatch.setattr(ports, "_ephemeral_floor", lambda: taken + 1)
        monkeypatch.setattr(ports, "BELOW_EPHEMERAL", 1)
        with pytest.raises(RuntimeError, match="no free port"):
            ports.free_port()


def test_a_server_can_listen_on_the_port(monkeypatch):
    port = ports.free_port()
    with socket.socket() as server:
        server.bind((ports.HOST, port))
        server.listen()
        with socket.create_connection((ports.HOST, port), timeout=5):
            pass


def test_the_range_falls_back_when_the_kernel_does_not_say(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(ports, "PORT_RANGE_FILE", tmp_path / "absent")
    assert ports._ephemeral_floor() == 32768
    garbled = tmp_path / "range"
    garbled.write_text("not a range\n")
    monkeypatch.setattr(ports, "PORT_RANGE_FILE", garbled)
    assert ports._ephemeral_floor() == 32768
    sane = tmp_path / "sane"
    sane.write_text("40000\t60999\n")
    monkeypatch.setattr(ports, "PORT_RANGE_FILE", sane)
    assert ports._ephemeral_floor() == 40000
