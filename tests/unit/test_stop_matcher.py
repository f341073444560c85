"""GIVEN streamed text and stop sequences WHEN fed piecewise
THEN output stops at the first match."""

from __future__ import annotations

from handler.engine.generation import StopMatcher


def run(stops, pieces):
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_no_stops_passes_everything_through():
    assert run([], ["a", "b"]) == ("ab", False)


def test_stop_split_across_pieces_is_found_and_removed():
    assert run(["END"], ["hello E", "N", "D more"]) == ("hello ", True)


def test_partial_prefix_is_held_then_released():
    matcher = StopMatcher(["\n\n"])
    assert matcher.feed("line\n") == ("line", False)
    assert matcher.feed("next") == ("\nnext", False)


def test_earliest_of_several_stops_wins():
    assert run(["b", "zz"], ["azzb"]) == ("a", True)


def test_text_held_at_end_is_flushed_when_no_stop_hit():
    assert run(["abc"], ["xab"]) == ("xab", False)
