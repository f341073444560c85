"""GIVEN a generation another thread pushes pieces into (the llama-server engine's collector)
WHEN its reader blocks, or listens and reads without blocking THEN a blocking reader gets every
piece, the error and the end in order; a listening reader is called back on the producer's
thread after each arrival and gets WAIT where it would block; a cancel or a drop asks the
producer to look at it; the end comes once."""

from __future__ import annotations

import gc
import threading

import pytest

from handler.engine.generation import WAIT, Piece, PushedGeneration
from handler.errors import ContextLengthExceeded


class Producer:
    """What the collector is to a generation: it pushes, and is asked to look."""

    def __init__(self) -> None:
        self.looks = 0

    def stop(self) -> None:
        self.looks += 1

    def generation(self, cancel: threading.Event | None = None) -> PushedGeneration:
        return PushedGeneration(7, cancel, self.stop)


def test_a_blocking_reader_gets_every_piece_then_the_end_pushed_from_another_thread():
    generation = Producer().generation()
    assert generation.result.prompt_tokens == 7

    def produce() -> None:
        for text in ("a", "b", "c"):
            generation.push(Piece(text))
        generation.finish()

    threading.Thread(target=produce).start()
    assert [p.text for p in generation.pieces()] == ["a", "b", "c"]
    assert list(generation.pieces()) == []  # ended: a later read ends at once too


def test_a_listening_reader_is_called_back_on_the_producers_thread_and_gets_wait():
    generation = Producer().generation()
    called_on: list[str] = []
    assert generation.listen(lambda: called_on.append(threading.current_thread().name))
    reader = generation.pieces_or_wait()
    assert next(reader) is WAIT  # nothing yet: no block

    def produce() -> None:
        generation.push(Piece("x"))
        generation.finish()

    producer = threading.Thread(target=produce, name="producer")
    producer.start()
    producer.join()
    assert called_on == ["producer", "producer"]  # the piece, the end
    assert next(reader) == Piece("x")
    with pytest.raises(StopIteration):
        next(reader)


def test_an_error_is_raised_to_the_reader_after_the_pieces_before_it():
    generation = Producer().generation()
    generation.push(Piece("so far"))
    generation.finish(ContextLengthExceeded("too long"))
    generation.finish()  # once: a second end is ignored
    reader = generation.pieces()
    assert next(reader).text == "so far"
    with pytest.raises(ContextLengthExceeded):
        next(reader)


def test_a_cancel_asks_the_producer_to_look_once_and_marks_it_cancelled():
    producer = Producer()
    cancel = threading.Event()
    generation = producer.generation(cancel)
    generation.cancel()
    generation.cancel()
    assert producer.looks == 1
    assert cancel.is_set() and generation.cancelled


def test_a_generation_dropped_unfinished_asks_the_producer_to_look_and_one_ended_does_not():
    producer = Producer()
    producer.generation()  # dropped at once
    gc.collect()
    assert producer.looks == 1
    ended = producer.generation()
    ended.finish()
    del ended
    gc.collect()
    assert producer.looks == 1
