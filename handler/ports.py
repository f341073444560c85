"""Ports for the servers we start on 127.0.0.1: llama-server's child here, and in bench/ and the
tests our function, the emulator and the anchors."""

from __future__ import annotations

import random
import socket
from pathlib import Path

HOST = "127.0.0.1"
PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
BELOW_EPHEMERAL = 12000  # how many ports under the ephemeral range we draw from
ATTEMPTS = 200

_HANDED_OUT: set[int] = set()


def _ephemeral_floor() -> int:
    """The lowest port the kernel gives an outgoing connection (Linux: ip_local_port_range)."""
    try:
        return int(PORT_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server we are about to start.

    Drawn below the kernel's ephemeral range, so that no client connection's local port can take it
    between this check and the server's bind (with port 0 it could: the emulator then died with a
    Go panic, status 2), and never the same port twice in one process."""
    floor = _ephemeral_floor()
    low = max(1024, floor - BELOW_EPHEMERAL)
    rng = random.SystemRandom()
    for _ in range(ATTEMPTS):
        port = rng.randrange(low, floor)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port between {low} and {floor}")
