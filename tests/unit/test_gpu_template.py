"""GIVEN template.yaml WHEN GpuImageUri is set THEN a GPU function runs the CUDA image on a capacity
provider, as many invocations per environment as llama-server has slots."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.unit.test_template import TEMPLATE, CfnLoader

GPU_RESOURCES = ("GpuOperatorRole", "GpuCapacityProvider", "GpuFunction")


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return yaml.load(TEMPLATE.read_text(), Loader=CfnLoader)  # a SafeLoader with tags


def test_gpu_resources_exist_only_with_an_image(template):
    for name in GPU_RESOURCES:
        assert template["Resources"][name]["Condition"] == "HasGpu"
    assert template["Conditions"]["HasGpu"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "GpuImageUri"}, ""]}]
    }
    assert template["Parameters"]["GpuImageUri"]["Default"] == ""  # off unless asked for


def test_gpu_function_runs_the_image_on_the_capacity_provider(template):
    props = template["Resources"]["GpuFunction"]["Properties"]
    assert props["PackageType"] == "Image"
    assert props["Architectures"] == ["x86_64"]  # the only architecture with accelerators
    config = props["CapacityProviderConfig"]["LambdaManagedInstancesCapacityProviderConfig"]
    assert config["CapacityProviderArn"] == {"Fn::GetAtt": "GpuCapacityProvider.Arn"}
    assert props["AcceleratorConfig"]["AcceleratorMemorySize"] == {"Ref": "GpuAcceleratorMemoryGiB"}
    allowed = template["Parameters"]["GpuAcceleratorMemoryGiB"]["AllowedValues"]
    assert allowed == [3, 6, 12, 16, 24, 48]


def test_one_environment_takes_as_many_invocations_as_there_are_slots(template):
    props = template["Resources"]["GpuFunction"]["Properties"]
    config = props["CapacityProviderConfig"]["LambdaManagedInstancesCapacityProviderConfig"]
    env = props["Environment"]["Variables"]
    assert config["PerExecutionEnvironmentMaxConcurrency"] == {"Ref": "GpuConcurrency"}
    assert env["PARALLEL_SLOTS"] == {"Ref": "GpuConcurrency"}
    assert env["INFERENCE_ENGINE"] == "llama-server"
    assert env["N_GPU_LAYERS"] == "-1"


def test_capacity_provider_needs_the_network_parameters(template):
    provider = template["Resources"]["GpuCapacityProvider"]["Properties"]
    assert provider["VpcConfig"] == {
        "SubnetIds": {"Ref": "SubnetIds"},
        "SecurityGroupIds": {"Ref": "SecurityGroupIds"},
    }
    assert "GpuNeedsNetwork" in template["Rules"]
