"""GIVEN the manifests in deploy/ WHEN validated offline (Kubernetes' own schemas, bundled by
kubernetes-validate; ECS's RegisterTaskDefinition model, bundled by botocore)
THEN they are valid, ask for a GPU, probe our routes, and set only variables that Settings reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from handler.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = sorted((ROOT / "deploy/k8s").glob("*.yaml"))
ECS_TASK = ROOT / "deploy/ecs/task-definition.json"
# EKS's standard-support versions when this was written; the oldest and the newest are checked.
K8S_VERSIONS = ["1.31.0", "1.34.0"]


def k8s_docs() -> dict[str, dict[str, Any]]:
    docs = [doc for path in K8S for doc in yaml.safe_load_all(path.read_text()) if doc]
    return {doc["kind"]: doc for doc in docs}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kubernetes_manifests_match_the_schema(path, version):
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


def container() -> dict[str, Any]:
    return k8s_docs()["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def check_environment(env: dict[str, str]) -> Settings:
    unknown = [name for name in env if name not in Settings.variables()]
    assert not unknown, f"not Settings fields: {unknown}"
    return load_settings(env)


def test_deployment_probes_our_routes_and_asks_for_a_gpu():
    c = container()
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"  # never touches the model
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    settings = check_environment(env)
    assert settings.inference_engine == "llama-server"
    assert settings.n_gpu_layers == -1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert settings.port == ports["http"]
    # Every probe goes to the health responder's port, which never queues behind requests.
    assert settings.health_port == ports["probes"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == "probes"
    assert settings.max_concurrency == settings.parallel_slots


def test_service_and_hpa_point_at_the_deployment():
    docs = k8s_docs()
    deployment, service, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == labels
    assert service["spec"]["ports"][0]["targetPort"] == container()["ports"][0]["name"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # The metric our /metrics exposes (telemetry: coldstart_ + the engine's queue_depth gauge).
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "coldstart_queue_depth"


def test_ecs_task_definition_matches_register_task_definition():
    from botocore.session import get_session
    from botocore.validate import ParamValidator

    task = json.loads(ECS_TASK.read_text())
    model = get_session().get_service_model("ecs")
    shape = model.operation_model("RegisterTaskDefinition").input_shape
    report = ParamValidator().validate(task, shape)
    assert not report.has_errors(), report.generate_report()


def test_ecs_task_asks_for_a_gpu_and_checks_readiness():
    task = json.loads(ECS_TASK.read_text())
    c = task["containerDefinitions"][0]
    assert {"type": "GPU", "value": "1"} in c["resourceRequirements"]
    settings = check_environment({e["name"]: e["value"] for e in c["environment"]})
    assert any(f":{settings.health_port}/readyz" in part for part in c["healthCheck"]["command"])
    assert settings.inference_engine == "llama-server"
    assert settings.port == c["portMappings"][0]["containerPort"]
