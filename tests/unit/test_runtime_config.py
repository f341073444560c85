"""GIVEN the runtime settings and the headers of a `/next` answer WHEN they are read THEN the right
runtime is chosen and each invocation knows its own deadline."""

from __future__ import annotations

import time

import pytest

from handler.aws_lambda.runtime_api import Invocation, InvocationContext
from handler.config import ConfigError, load_settings, runtime_api_address


def settings(**env: str):
    return load_settings({"MODEL_URI": "/models/m.gguf", **env})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "awslambdaric"),
        ({"INVOKE_MODE": "RESPONSE_STREAM"}, "coldstart"),
        ({"INVOKE_MODE": "response_stream"}, "coldstart"),
        ({"AWS_LAMBDA_MAX_CONCURRENCY": "4"}, "coldstart"),
        ({"RUNTIME": "coldstart"}, "coldstart"),
        ({"RUNTIME": "awslambdaric", "AWS_LAMBDA_MAX_CONCURRENCY": "4"}, "awslambdaric"),
    ],
)
def test_auto_picks_our_loop_where_awslambdaric_falls_short(env, expected):
    assert settings(**env).lambda_runtime == expected


def test_bad_runtime_values_name_the_variable():
    with pytest.raises(ConfigError, match="INVOKE_MODE"):
        settings(INVOKE_MODE="SOMETIMES")
    with pytest.raises(ConfigError, match="AWS_LAMBDA_MAX_CONCURRENCY"):
        settings(AWS_LAMBDA_MAX_CONCURRENCY="0")


def test_runtime_api_address_is_readable_without_the_rest_of_the_config():
    env = {"AWS_LAMBDA_RUNTIME_API": "127.0.0.1:9001", "N_CTX": "lots"}
    assert runtime_api_address(env) == "127.0.0.1:9001"
    assert runtime_api_address({}) is None


def test_context_counts_down_to_the_deadline_header():
    invocation = Invocation(
        request_id="r1",
        deadline_ms=int(time.time() * 1000) + 30_000,
        function_arn="arn:aws:lambda:us-east-1:123456789012:function:f",
        trace_id=None,
        client_context=None,
        cognito_identity=None,
        payload=b"{}",
    )
    context = InvocationContext(invocation, settings(AWS_LAMBDA_FUNCTION_NAME="f"))
    assert 0 < context.get_remaining_time_in_millis() <= 30_000
    assert context.aws_request_id == "r1" and context.function_name == "f"
