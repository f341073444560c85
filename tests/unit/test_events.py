"""GIVEN each sample in events/ WHEN classified THEN its documented source is recognised."""

from __future__ import annotations

import pytest

from handler.aws_lambda.events import EventKind, classify
from tests.conftest import EVENTS_DIR, load_event

EXPECTED = {
    "function-url-chat.json": EventKind.FUNCTION_URL,
    "function-url-chat-stream.json": EventKind.FUNCTION_URL,
    "function-url-models.json": EventKind.FUNCTION_URL,
    "function-url-completion-base64.json": EventKind.FUNCTION_URL,
    "apigw-v1-chat.json": EventKind.API_GATEWAY_V1,
    "apigw-v2-chat.json": EventKind.API_GATEWAY_V2,
    "alb-chat.json": EventKind.ALB,
    "eventbridge-keep-warm.json": EventKind.KEEP_WARM,
    "direct-chat.json": EventKind.DIRECT,
    "direct-completion.json": EventKind.DIRECT,
    "direct-embedding.json": EventKind.DIRECT,
}


@pytest.mark.parametrize(("name", "kind"), sorted(EXPECTED.items()))
def test_sample_event_is_classified(name, kind):
    assert classify(load_event(name)) is kind


def test_every_top_level_event_file_has_an_expectation():
    names = {p.name for p in EVENTS_DIR.glob("*.json")}
    assert names == set(EXPECTED), "add new events/ files to EXPECTED"


@pytest.mark.parametrize(
    "event",
    [
        None,
        [],
        "ping",
        3,
        {},
        {"hello": "world"},
        {"source": "aws.events", "detail-type": "Object Created"},
    ],
)
def test_anything_else_is_unknown(event):
    assert classify(event) is EventKind.UNKNOWN
