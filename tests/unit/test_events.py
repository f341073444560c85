"""GIVEN each sample in events/ WHEN classified THEN its documented source is recognised."""

from __future__ import annotations

import pytest

from handler.aws_lambda.events import KEEP_WARM_INPUT, EventKind, classify
from tests.conftest import EVENTS_DIR, load_event

EXPECTED = {
    "function-url-chat.json": EventKind.FUNCTION_URL,
    "function-url-chat-stream.json": EventKind.FUNCTION_URL,
    "function-url-models.json": EventKind.FUNCTION_URL,
    "function-url-completion-base64.json": EventKind.FUNCTION_URL,
    "function-url-responses-stream.json": EventKind.FUNCTION_URL,
    "function-url-chat-tools.json": EventKind.FUNCTION_URL,
    "function-url-chat-tools-stream.json": EventKind.FUNCTION_URL,
    "apigw-v1-chat.json": EventKind.API_GATEWAY_V1,
    "apigw-v2-chat.json": EventKind.API_GATEWAY_V2,
    "alb-chat.json": EventKind.ALB,
    "eventbridge-keep-warm.json": EventKind.KEEP_WARM,
    "scheduler-keep-warm.json": EventKind.KEEP_WARM,
    "scheduler-keep-warm-input.json": EventKind.KEEP_WARM,
    "direct-chat.json": EventKind.DIRECT,
    "direct-completion.json": EventKind.DIRECT,
    "direct-embedding.json": EventKind.DIRECT,
    "direct-response.json": EventKind.DIRECT,
    "direct-chat-structured.json": EventKind.DIRECT,
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
        {"source": "aws.scheduler", "detail-type": "Schedule Updated", "detail": "{}"},
        {"source": "aws.ec2", "detail-type": "Scheduled Event", "detail": {}},
        {"coldstart": "keep-cold"},
        {"source": ["aws.scheduler"], "detail-type": "Scheduled Event"},  # not a string
        {"keep-warm": True},
    ],
)
def test_anything_else_is_unknown(event):
    assert classify(event) is EventKind.UNKNOWN


def test_scheduler_sample_is_the_documented_default_notification():
    """GIVEN the Scheduler sample WHEN read THEN it has the fields Scheduler documents for its
    default notification: detail is the string "{}", not an object."""
    event = load_event("scheduler-keep-warm.json")
    assert event["source"] == "aws.scheduler"
    assert event["detail"] == "{}"
    assert event["resources"][0].startswith("arn:aws:scheduler:")


def test_the_keep_warm_input_is_the_sample_the_template_sends():
    """GIVEN the custom input sample WHEN compared with KEEP_WARM_INPUT THEN they are the same
    (tests/unit/test_template.py checks that the template sends exactly it)."""
    assert load_event("scheduler-keep-warm-input.json") == KEEP_WARM_INPUT
