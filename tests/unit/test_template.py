"""template.yaml and the code stay in step: every variable it sets is a Settings field, and every
value its parameters allow passes Settings' validation."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from handler.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"


class CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (`!Ref X` -> `{"Ref": "X"}`, `!If` -> `Fn::If`)."""


def _short_tag(loader: CfnLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}


CfnLoader.add_multi_constructor("!", _short_tag)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return yaml.load(TEMPLATE.read_text(), Loader=CfnLoader)  # a SafeLoader with tags


def functions(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: res
        for name, res in template["Resources"].items()
        if res["Type"] in {"AWS::Serverless::Function", "AWS::Lambda::Function"}
    }


def env_vars(template: dict[str, Any]) -> dict[str, Any]:
    """Every environment variable set for a function (Globals included)."""
    found: dict[str, Any] = {}
    globals_env = template.get("Globals", {}).get("Function", {}).get("Environment", {})
    found.update(globals_env.get("Variables", {}))
    for res in functions(template).values():
        found.update(res["Properties"].get("Environment", {}).get("Variables", {}))
    return found


def candidates(template: dict[str, Any], value: Any) -> list[str]:
    """The values a variable can take: each branch of Fn::If, each allowed or bounding value of a
    referenced parameter (its default first), with parameters substituted in Fn::Sub."""
    params = template["Parameters"]
    if isinstance(value, dict) and "Ref" in value:
        spec = params[value["Ref"]]
        values = [spec.get("Default", "")]
        values += spec.get("AllowedValues", [])
        values += [spec[k] for k in ("MinValue", "MaxValue") if k in spec]
        return [str(v) for v in values]
    if isinstance(value, dict) and "Fn::If" in value:
        _, then, otherwise = value["Fn::If"]
        return candidates(template, then) + candidates(template, otherwise)
    if isinstance(value, dict) and "Fn::Sub" in value:
        text = value["Fn::Sub"]
        return [
            re.sub(r"\$\{(\w+)\}", lambda m: str(params[m.group(1)].get("Default") or "x"), text)
        ]
    if isinstance(value, dict):
        pytest.fail(f"no resolver for {value}: extend candidates() in tests/unit/test_template.py")
    return [str(value)]


def test_template_sets_variables(template: dict[str, Any]) -> None:
    assert functions(template), "no function in template.yaml"
    assert "MODEL_URI" in env_vars(template)


def test_every_variable_is_a_settings_field(template: dict[str, Any]) -> None:
    fields = set(Settings.variables())
    unknown = sorted(set(env_vars(template)) - fields)
    assert not unknown, f"template.yaml sets variables Settings does not read: {unknown}"


def test_defaults_load(template: dict[str, Any]) -> None:
    env = {name: candidates(template, value)[0] for name, value in env_vars(template).items()}
    load_settings(env)


def test_every_allowed_value_loads(template: dict[str, Any]) -> None:
    for name, value in env_vars(template).items():
        for candidate in candidates(template, value):
            try:
                load_settings({name: candidate})
            except ConfigError as exc:
                pytest.fail(
                    f"template.yaml allows {name}={candidate!r} but Settings refuses: {exc}"
                )


def test_image_build_args_are_dockerfile_args(template: dict[str, Any]) -> None:
    for res in functions(template).values():
        meta = res.get("Metadata", {})
        if res["Properties"].get("PackageType") != "Image" or "Dockerfile" not in meta:
            continue  # the GPU function takes a pushed image (Code.ImageUri): nothing to build
        dockerfile = ROOT / meta.get("DockerContext", ".") / meta["Dockerfile"]
        declared = set(re.findall(r"^ARG (\w+)", dockerfile.read_text(), flags=re.MULTILINE))
        assert set(meta.get("DockerBuildArgs", {})) <= declared


def test_snapstart_is_a_switch_on_published_versions(template):
    function = template["Resources"]["ColdstartFunction"]["Properties"]
    condition, on, off = function["SnapStart"]["Fn::If"]
    assert condition == "UseSnapStart"
    assert on == {"ApplyOn": "PublishedVersions"}
    assert off == {"Ref": "AWS::NoValue"}
    assert function["AutoPublishAlias"]  # SnapStart applies to published versions only
    assert template["Parameters"]["SnapStart"]["Default"] == "false"


def test_snapstart_refuses_what_it_cannot_do(template):
    rule = template["Rules"]["SnapStartLimits"]
    assert rule["RuleCondition"] == {"Fn::Equals": [{"Ref": "SnapStart"}, "true"]}
    asserted = {
        a["Assert"]["Fn::Equals"][0]["Ref"]: a["Assert"]["Fn::Equals"][1]
        for a in rule["Assertions"]
    }
    assert asserted == {
        "EfsAccessPointArn": "",  # no EFS with SnapStart
        "EphemeralStorageMB": "512",  # no ephemeral storage over 512 MB
        "ProvisionedConcurrency": "0",  # one or the other
    }
    storage = template["Parameters"]["EphemeralStorageMB"]
    assert storage["MinValue"] == 512 and storage["Default"] == 512


def condition(template: dict[str, Any], name: str, params: dict[str, str]) -> bool:
    """Evaluate the template's condition `name` for parameter values `params` (defaults else)."""
    values = {k: str(v.get("Default", "")) for k, v in template["Parameters"].items()} | params

    def value(node: Any) -> Any:
        if isinstance(node, dict) and "Ref" in node:
            return values[node["Ref"]]
        if isinstance(node, dict):
            return truth(node)
        return str(node)

    def truth(node: Any) -> bool:
        (function, args), *_ = node.items()
        if function == "Fn::Equals":
            return bool(value(args[0]) == value(args[1]))
        if function == "Fn::Not":
            return not truth(args[0])
        if function == "Fn::Or":
            return any(truth(a) for a in args)
        if function == "Fn::And":
            return all(truth(a) for a in args)
        if function == "Fn::Condition":
            return truth(template["Conditions"][args])
        pytest.fail(f"no evaluator for {function}: extend condition() in test_template.py")

    return truth(template["Conditions"][name])


def keep_warm_schedule(template: dict[str, Any]) -> dict[str, Any]:
    event = template["Resources"]["ColdstartFunction"]["Properties"]["Events"]["KeepWarm"]
    assert event["Type"] == "ScheduleV2"  # EventBridge Scheduler, not an EventBridge rule
    return dict(event["Properties"])


def test_keep_warm_schedule_sends_the_ping_the_function_recognises(template):
    """GIVEN the template's ScheduleV2 WHEN its input is classified THEN it is the keep-warm ping
    and the sample in events/ is exactly what the schedule sends."""
    from handler.aws_lambda.events import EventKind, classify
    from tests.conftest import load_event

    schedule = keep_warm_schedule(template)
    sent = json.loads(schedule["Input"])
    assert classify(sent) is EventKind.KEEP_WARM
    assert sent == load_event("scheduler-keep-warm-input.json")


def test_keep_warm_schedule_has_no_window_and_no_retries(template):
    """GIVEN the schedule WHEN read THEN it fires on time and never retries (a missed ping is
    harmless, a retried one is waste), at the rate its parameter sets."""
    schedule = keep_warm_schedule(template)
    assert schedule["FlexibleTimeWindow"] == {"Mode": "OFF"}
    assert schedule["RetryPolicy"]["MaximumRetryAttempts"] == 0
    assert schedule["ScheduleExpression"] == {"Ref": "KeepWarmRate"}
    assert schedule["State"] == {"Fn::If": ["KeepWarm", "ENABLED", "DISABLED"]}
    rate = template["Parameters"]["KeepWarmRate"]
    assert re.fullmatch(rate["AllowedPattern"], rate["Default"])


@pytest.mark.parametrize(
    ("params", "enabled"),
    [
        ({}, True),  # auto, on demand: ping
        ({"ProvisionedConcurrency": "2"}, False),  # frozen warm: no ping
        ({"SnapStart": "true"}, False),  # restored warm: no ping
        ({"KeepWarmEnabled": "true", "ProvisionedConcurrency": "2"}, True),
        ({"KeepWarmEnabled": "true", "SnapStart": "true"}, True),
        ({"KeepWarmEnabled": "false"}, False),
    ],
)
def test_keep_warm_is_off_by_default_with_provisioned_concurrency_or_snapstart(
    template, params, enabled
):
    """GIVEN the parameters WHEN the KeepWarm condition is evaluated THEN auto pings only an
    on-demand function; true and false force it."""
    assert template["Parameters"]["KeepWarmEnabled"]["Default"] == "auto"
    assert condition(template, "KeepWarm", params) is enabled


def test_both_functions_log_json_at_the_levels_parameters_set(template):
    """GIVEN each function WHEN its LoggingConfig is read THEN the format is JSON (which Lambda
    Managed Instances require) and both levels come from parameters; every application level
    the parameter allows is one Settings accepts as AWS_LAMBDA_LOG_LEVEL."""
    for name, function in functions(template).items():
        logging_config = function["Properties"]["LoggingConfig"]
        assert logging_config["LogFormat"] == "JSON", name
        assert logging_config["ApplicationLogLevel"] == {"Ref": "ApplicationLogLevel"}, name
        assert logging_config["SystemLogLevel"] == {"Ref": "SystemLogLevel"}, name
    for level in template["Parameters"]["ApplicationLogLevel"]["AllowedValues"]:
        settings = load_settings({"AWS_LAMBDA_LOG_FORMAT": "JSON", "AWS_LAMBDA_LOG_LEVEL": level})
        assert settings.aws_lambda_log_format == "JSON"
        assert settings.logging_level in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
