"""GIVEN an answer's bytes split anywhere (as a socket hands them over) WHEN the push parser
(`AnswerFeed`, the collector's) takes them THEN it gives the same lines as the whole answer would,
knows when the body has ended, and fails clearly on a malformed or cut-short answer."""

from __future__ import annotations

import pytest

from handler.engine.llama_server.upstream import AnswerFeed, BrokenAnswer


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


HEAD_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
EVENTS = [
    b'data: {"content": "a"}\n\n',
    b'data: {"content": "b\\u00e9"}\n\n',
    b'data: {"stop": true}\n\n',
]
CHUNKED = HEAD_CHUNKED + b"".join(chunk(e) for e in EVENTS) + b"0\r\n\r\n"
WANT = [
    b'data: {"content": "a"}',
    b"",
    b'data: {"content": "b\\u00e9"}',
    b"",
    b'data: {"stop": true}',
    b"",
]


def fed(feed: AnswerFeed, data: bytes, step: int) -> list[bytes]:
    lines: list[bytes] = []
    for i in range(0, len(data), step):
        lines += feed.feed(data[i : i + step])
    return lines


@pytest.mark.parametrize("step", [1, 2, 7, 64, 10_000])
def test_a_chunked_stream_split_anywhere_gives_the_same_lines(step):
    feed = AnswerFeed()
    assert fed(feed, CHUNKED, step) == WANT
    assert feed.status == 200 and feed.complete
    assert feed.headers["content-type"] == "text/event-stream"


def test_nothing_before_the_head_is_in_and_not_complete_before_the_last_chunk():
    feed = AnswerFeed()
    assert feed.feed(HEAD_CHUNKED[:-2]) == [] and feed.status is None
    assert feed.feed(b"\r\n" + chunk(EVENTS[0])[:-3]) == []  # the chunk is not whole yet
    assert feed.status == 200 and not feed.complete
    assert feed.feed(chunk(EVENTS[0])[-3:]) == WANT[:2]
    assert not feed.complete
    with pytest.raises(BrokenAnswer, match="mid-answer"):
        feed.end()  # the connection ended before the last chunk


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_an_error_answer_with_content_length(step):
    body = b'{"error": {"code": 400, "message": "too long"}}'
    answer = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    feed = AnswerFeed()
    assert fed(feed, answer, step) == [body]
    assert feed.status == 400 and feed.complete


def test_a_body_that_ends_with_the_connection():
    feed = AnswerFeed()
    assert feed.feed(b"HTTP/1.1 200 OK\r\n\r\nline one\nline t") == [b"line one"]
    assert not feed.complete
    assert feed.end() == [b"line t"] and feed.complete


def test_an_empty_content_length_body_is_complete_with_its_head():
    feed = AnswerFeed()
    assert feed.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") == []
    assert feed.complete


@pytest.mark.parametrize(
    "answer, error",
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x answer"),
        (HEAD_CHUNKED + b"zz\r\nabc\r\n", "bad chunk size"),
        (HEAD_CHUNKED + b"3\r\nabcXY", "does not end with CRLF"),
    ],
)
def test_a_malformed_answer_is_a_clear_error(answer, error):
    with pytest.raises(BrokenAnswer, match=error):
        AnswerFeed().feed(answer)


def test_headers_that_never_end_are_refused():
    feed = AnswerFeed()
    with pytest.raises(BrokenAnswer, match="too long"):
        for _ in range(100):
            feed.feed(b"X-Filler: " + b"x" * 1000 + b"\r\n")
