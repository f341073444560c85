"""GIVEN a generation read on the thread that iterates it (the llama-server engine's) WHEN it is
read to the end, stopped early, cancelled or dropped unread THEN its request is released exactly
once, and its pieces come from the reading thread itself."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from handler.engine.generation import Piece, PulledGeneration


class Upstream:
    """A request in flight: the pieces it answers, the threads that read them, its releases."""

    def __init__(self, *texts: str) -> None:
        self.texts = texts
        self.releases = 0
        self.read_on: set[int] = set()

    def release(self) -> None:
        self.releases += 1

    def source(self) -> Iterator[Piece]:
        for text in self.texts:
            self.read_on.add(threading.get_ident())
            yield Piece(text)

    def generation(self, cancel: threading.Event | None = None) -> PulledGeneration:
        generation = PulledGeneration(5, cancel, self.release)
        generation.read_from(self.source())
        return generation


def test_read_to_the_end_on_the_readers_thread_then_released_once():
    upstream = Upstream("a", "b", "c")
    generation = upstream.generation()
    assert upstream.releases == 0  # in flight until read
    assert generation.text() == "abc"
    assert upstream.read_on == {threading.get_ident()}
    assert upstream.releases == 1
    generation.cancel()
    assert list(generation) == []  # nothing more, no second release
    assert upstream.releases == 1
    assert generation.result.prompt_tokens == 5


def test_cancelled_unread_releases_at_once_and_reads_nothing():
    upstream = Upstream("a", "b")
    generation = upstream.generation()
    generation.cancel()
    assert upstream.releases == 1
    assert generation.result.interrupted and generation.cancelled
    assert generation.text() == ""
    assert upstream.read_on == set()
    assert upstream.releases == 1


def test_a_reader_that_stops_early_leaves_the_rest_for_the_next():
    upstream = Upstream("a", "b", "c")
    generation = upstream.generation()
    assert next(iter(generation)) == "a"  # that iterator is dropped at once
    assert upstream.releases == 0
    assert generation.text() == "bc"
    assert upstream.releases == 1


@pytest.mark.parametrize("then", ["cancel", "drop"])
def test_a_stopped_reader_then_a_cancel_or_drop_releases_it(then):
    upstream = Upstream("a", "b", "c")
    generation = upstream.generation()
    pieces = generation.pieces()
    assert next(pieces).text == "a"
    pieces.close()  # e.g. the client hung up and the chunk stream was closed
    assert upstream.releases == 0
    if then == "cancel":
        generation.cancel()
        assert generation.result.interrupted
    else:
        del generation
        gc.collect()
    assert upstream.releases == 1


def test_a_reader_stopped_after_a_cancel_releases_it_as_it_stops():
    upstream = Upstream("a", "b", "c")
    generation = upstream.generation()
    pieces = generation.pieces()
    next(pieces)
    generation.cancel()
    pieces.close()
    assert upstream.releases == 1


def test_cancel_while_reading_leaves_the_release_to_the_reader():
    upstream = Upstream("a", "b")
    generation = upstream.generation()
    pieces = generation.pieces()
    next(pieces)
    generation.cancel()  # the source sees it at its next piece; the reader still owns it
    assert upstream.releases == 0
    assert [piece.text for piece in pieces] == ["b"]
    assert upstream.releases == 1


def test_dropped_unread_is_released():
    upstream = Upstream("a")
    generation = upstream.generation()
    del generation
    gc.collect()
    assert upstream.releases == 1


def test_a_generation_with_nothing_to_read_ends_unread():
    upstream = Upstream("a")
    generation = PulledGeneration(3, None, upstream.release)
    generation.end_unread()
    assert upstream.releases == 1
    assert generation.text() == ""
    generation.cancel()
    assert upstream.releases == 1


def test_the_sources_error_reaches_the_reader_and_releases():
    releases = []

    def broken() -> Iterator[Piece]:
        yield Piece("a")
        raise ConnectionResetError("child gone")

    generation = PulledGeneration(1, None, lambda: releases.append(1))
    generation.read_from(broken())
    with pytest.raises(ConnectionResetError):
        generation.text()
    assert releases == [1]


def test_a_callers_cancel_event_is_the_generations():
    cancel = threading.Event()
    generation = Upstream("a").generation(cancel)
    cancel.set()
    assert generation.cancelled
    assert generation.should_stop(None) and generation.result.interrupted
