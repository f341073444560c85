"""GIVEN the probe board shared by the serving loop and the health responder WHEN the loop posts
THEN the other side reads the state, the load and how long the loop has been silent."""

from __future__ import annotations

import os
import time

import pytest

from handler.engine import EngineState
from handler.web.probe_board import STATES, ProbeBoard


def test_every_engine_state_can_be_posted():
    assert set(STATES) == {state.value for state in EngineState}


def test_a_post_is_read_through_another_mapping_of_the_same_memory():
    board = ProbeBoard.create()
    other = ProbeBoard.attach(os.dup(board.fd))
    try:
        assert other.read() is None  # nothing posted yet
        board.post("loading", 3)
        posted = other.read()
        assert posted is not None
        assert (posted.state, posted.in_flight) == ("loading", 3)
        assert 0 <= posted.silent_s < 1
        time.sleep(0.05)
        later = other.read()
        assert later is not None and later.silent_s >= 0.05  # silence grows until the next post
        board.post("warm", 0)
        again = other.read()
        assert again is not None and again.state == "warm" and again.silent_s < later.silent_s
    finally:
        other.close()
        board.close()


def test_a_descriptor_that_is_not_a_board_is_refused(tmp_path):
    path = tmp_path / "zeros"
    path.write_bytes(bytes(os.sysconf("SC_PAGE_SIZE")))
    fd = os.open(path, os.O_RDWR)
    with pytest.raises(ValueError, match="not a probe board"):
        ProbeBoard.attach(fd)
