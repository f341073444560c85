"""Recognises what kind of Lambda event arrived, by the fields AWS documents for each source;
a direct invoke by the field that marks its route in the route table."""

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
    DIRECT = "direct"
    UNKNOWN = "unknown"


HTTP_KINDS = frozenset(
    {EventKind.FUNCTION_URL, EventKind.API_GATEWAY_V1, EventKind.API_GATEWAY_V2, EventKind.ALB}
)

# The scheduled events AWS delivers without a custom input: an EventBridge rule's
# (`"source": "aws.events"`, `detail` an object) and EventBridge Scheduler's default notification
# (`"source": "aws.scheduler"`, `detail` the string "{}"), both `"detail-type": "Scheduled Event"`.
SCHEDULE_SOURCES = frozenset({"aws.events", "aws.scheduler"})
# The input template.yaml's ScheduleV2 target sends (events/scheduler-keep-warm-input.json).
KEEP_WARM_INPUT = {"coldstart": "keep-warm"}


def is_keep_warm(event: dict[str, Any]) -> bool:
    """Whether `event` is a keep-warm ping: a scheduled event from an EventBridge rule or from
    EventBridge Scheduler, or a Scheduler target's custom input carrying KEEP_WARM_INPUT."""
    source = event.get("source")
    scheduled = isinstance(source, str) and source in SCHEDULE_SOURCES
    if scheduled and event.get("detail-type") == "Scheduled Event":
        return True
    return all(event.get(key) == value for key, value in KEEP_WARM_INPUT.items())


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
    if is_keep_warm(event):
        return EventKind.KEEP_WARM
    # The route table knows which payload field marks which route (imported on first use: the
    # runtime loop classifies events before its init has started the model load).
    from handler.web.routes import direct_route

    if direct_route(event) is not None:
        return EventKind.DIRECT
    return EventKind.UNKNOWN
