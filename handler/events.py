"""Recognises what kind of Lambda event arrived, by the fields AWS documents for each source."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class EventKind(StrEnum):
    """Every event source the function answers, and `unknown` for the rest."""

    FUNCTION_URL = "function_url"
    API_GATEWAY_V1 = "api_gateway_v1"
    API_GATEWAY_V2 = "api_gateway_v2"
    ALB = "alb"
    KEEP_WARM = "keep_warm"
    DIRECT_CHAT = "direct_chat"
    DIRECT_COMPLETION = "direct_completion"
    DIRECT_EMBEDDING = "direct_embedding"
    UNKNOWN = "unknown"


HTTP_KINDS = frozenset(
    {EventKind.FUNCTION_URL, EventKind.API_GATEWAY_V1, EventKind.API_GATEWAY_V2, EventKind.ALB}
)
DIRECT_KINDS = frozenset(
    {EventKind.DIRECT_CHAT, EventKind.DIRECT_COMPLETION, EventKind.DIRECT_EMBEDDING}
)


def classify(event: Any) -> EventKind:
    """The kind of `event`; HTTP kinds are the ones Mangum can translate."""
    if not isinstance(event, dict):
        return EventKind.UNKNOWN
    context = event.get("requestContext")
    if isinstance(context, dict):
        if "elb" in context:
            return EventKind.ALB
        if event.get("version") == "2.0":
            domain = str(context.get("domainName", ""))
            return EventKind.FUNCTION_URL if ".lambda-url." in domain else EventKind.API_GATEWAY_V2
        if "resource" in event and "httpMethod" in event:
            return EventKind.API_GATEWAY_V1
    if event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event":
        return EventKind.KEEP_WARM
    if "messages" in event:
        return EventKind.DIRECT_CHAT
    if "prompt" in event:
        return EventKind.DIRECT_COMPLETION
    if "input" in event:
        return EventKind.DIRECT_EMBEDDING
    return EventKind.UNKNOWN
