"""infra/ray/cluster-{aws,gcp}.yaml, checked offline with Ray's own cluster launcher code: each
file goes through `prepare_config` (the defaults merge `ray up` does before it calls a cloud)
and `validate_config` (ray/autoscaler/ray-schema.json plus Ray's cross-field checks), and
broken copies are shown to fail the same check. Then the design: every node runs the lamina
image; the head is CPU-only with CPU 0 for scheduling, so lamina's workers never land there;
an H100 and an A100 type of 8 GPUs each scale from zero, their resources match the machine
(the table below, from the providers' published specs) and a recipe can pin each kind through
`resources.custom`; the GPU VMs get a driver image and the settings GPUs need; storage access
comes from the node's identity, never from a credential in the file. Nothing here reaches a
cloud or starts Ray: instance types, AMI ids and image families are not checked to exist."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT
from tests.test_infra_docker import IMAGE  # the one image of every Ray node, as in infra/k8s and the docs

CLUSTERS = {"aws": ROOT / "infra" / "ray" / "cluster-aws.yaml", "gcp": ROOT / "infra" / "ray" / "cluster-gcp.yaml"}
RAY_BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}


@dataclass(frozen=True)
class Machine:
    accelerator: str  # the custom resource recipes pin it with, one unit per GPU
    gpus: int
    cpus: int  # vCPUs
    ram_gib: int


MACHINES = {
    "p5.48xlarge": Machine("accelerator_h100", gpus=8, cpus=192, ram_gib=2048),
    "p4d.24xlarge": Machine("accelerator_a100", gpus=8, cpus=96, ram_gib=1152),
    "p4de.24xlarge": Machine("accelerator_a100_80g", gpus=8, cpus=96, ram_gib=1152),
    "a3-highgpu-8g": Machine("accelerator_h100", gpus=8, cpus=208, ram_gib=1872),
    "a2-highgpu-8g": Machine("accelerator_a100", gpus=8, cpus=96, ram_gib=680),
    "a2-ultragpu-8g": Machine("accelerator_a100_80g", gpus=8, cpus=96, ram_gib=1360),
}


def load(cloud: str) -> dict:
    return yaml.safe_load(CLUSTERS[cloud].read_text())


def ray_check(config: dict) -> dict:
    """What `ray up` does to the file before it talks to a cloud: merge the provider's
    defaults.yaml, then validate against Ray's schema and cross-field rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def machine_type(node_type: dict) -> str:
    node_config = node_type["node_config"]
    return node_config.get("InstanceType") or node_config["machineType"]


def gpu_types(config: dict) -> dict[str, dict]:
    return {
        name: node_type
        for name, node_type in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def fits(bundle: dict[str, float], resources: dict[str, float], times: int = 1) -> bool:
    return all(times * amount <= resources.get(key, 0) for key, amount in bundle.items())


@pytest.mark.parametrize("cloud", CLUSTERS)
def test_ray_accepts_each_file_and_adds_no_setup_commands(cloud) -> None:
    prepared = ray_check(load(cloud))
    assert prepared["provider"]["type"] == cloud
    # defaults.yaml would add `pip install` commands (a Ray nightly wheel) if the file left
    # these out: the image already holds everything
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        assert prepared[key] == [], key


def rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


# A broken copy of either file and the complaint of Ray's schema it must get.
BROKEN = {
    "a misspelled top-level key": (
        lambda c: rename(c, "max_workers", "max_worker"),
        "'max_worker' was unexpected",
    ),
    "a misspelled node type field": (
        lambda c: rename(c["available_node_types"]["gpu_h100"], "min_workers", "min_worker"),
        "'min_worker' was unexpected",
    ),
    "a fractional resource": (
        lambda c: c["available_node_types"]["gpu_h100"]["resources"].update(GPU=7.5),
        "7.5 is not of type 'integer'",
    ),
    "a misspelled docker option": (
        lambda c: rename(c["docker"], "pull_before_run", "pull_before_runs"),
        "'pull_before_runs' was unexpected",
    ),
    "a node type without resources": (
        lambda c: c["available_node_types"]["gpu_a100"].pop("resources"),
        "'resources' is a required property",
    ),
}


@pytest.mark.parametrize("cloud", CLUSTERS)
@pytest.mark.parametrize("breakage", BROKEN)
def test_ray_rejects_a_broken_copy(cloud, breakage) -> None:
    config = load(cloud)
    breaks, complaint = BROKEN[breakage]
    breaks(config)
    with pytest.raises(jsonschema.ValidationError) as rejected:
        ray_check(config)
    assert complaint in rejected.value.message


@pytest.mark.parametrize("cloud", CLUSTERS)
def test_ray_rejects_a_head_type_that_does_not_exist(cloud) -> None:
    config = load(cloud)
    config["head_node_type"] = "head_typo"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_check(config)


@pytest.mark.parametrize("cloud", CLUSTERS)
def test_every_node_runs_the_lamina_image(cloud) -> None:
    config = load(cloud)
    docker = config["docker"]
    assert docker["image"] == IMAGE
    assert docker["pull_before_run"] is True
    assert "head_image" not in docker and "worker_image" not in docker
    for name, node_type in config["available_node_types"].items():
        assert "worker_image" not in node_type.get("docker", {}), name
    assert "--gpus all" in docker["worker_run_options"]


@pytest.mark.parametrize("cloud", CLUSTERS)
def test_the_head_takes_no_worker(cloud) -> None:
    from pipeline.recipe import parse

    config = load(cloud)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert head["resources"].get("GPU", 0) == 0
    assert set(head["resources"]) <= RAY_BUILTIN
    smallest_worker = parse({"model": "s3://b/m", "output": "s3://b/o", "resources": {"cpus_per_worker": 0.01}})
    assert not fits(smallest_worker.resources.bundle(), head["resources"])


@pytest.mark.parametrize("cloud", CLUSTERS)
def test_h100_and_a100_nodes_of_8_gpus_scale_from_zero(cloud) -> None:
    config = load(cloud)
    types = gpu_types(config)
    kinds = {MACHINES[machine_type(t)].accelerator for t in types.values()}
    assert {"accelerator_h100", "accelerator_a100"} <= kinds
    for name, node_type in types.items():
        machine = MACHINES[machine_type(node_type)]
        resources = node_type["resources"]
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] >= 1, name
        assert resources["GPU"] == machine.gpus == 8, name
        assert resources["CPU"] == machine.cpus, name
        assert 0 < resources["memory"] <= 0.75 * machine.ram_gib * 2**30, name
        assert set(resources) - RAY_BUILTIN == {machine.accelerator}, name
        assert resources[machine.accelerator] == resources["GPU"], name
    assert config["max_workers"] >= sum(t["max_workers"] for t in types.values())
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("cloud", CLUSTERS)
def test_a_recipe_pins_each_gpu_kind_and_8_workers_fill_a_node(cloud) -> None:
    from pipeline.recipe import parse

    config = load(cloud)
    for name, node_type in gpu_types(config).items():
        machine = MACHINES[machine_type(node_type)]
        resources = {
            "gpus_per_worker": 1,
            "cpus_per_worker": machine.cpus // machine.gpus,
            "memory_per_worker_gib": node_type["resources"]["memory"] // machine.gpus // 2**30,
            "solve_device": "gpu",
            "custom": {machine.accelerator: 1},
        }
        recipe = parse({"model": "s3://b/m", "output": "s3://b/o", "resources": resources})
        bundle = recipe.resources.bundle()
        assert fits(bundle, node_type["resources"], times=machine.gpus), name
        assert not fits(bundle, node_type["resources"], times=machine.gpus + 1), name
        others = [t for n, t in gpu_types(config).items() if machine_type(t) != machine_type(node_type)]
        assert not any(fits(bundle, other["resources"]) for other in others), name


@pytest.mark.parametrize("cloud", CLUSTERS)
def test_the_head_serves_the_dashboard_and_workers_join_it(cloud) -> None:
    config = load(cloud)
    head = " ".join(config["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=0.0.0.0" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


SECRETS = re.compile(
    r"aws_access_key_id|aws_secret|secret_access_key|private_key|-----BEGIN|AKIA[0-9A-Z]{16}|"
    r"aws_credentials|gcp_credentials|client_secret",
    re.IGNORECASE,
)


@pytest.mark.parametrize("cloud", CLUSTERS)
def test_storage_access_comes_from_the_node_identity_not_the_file(cloud) -> None:
    assert SECRETS.search(CLUSTERS[cloud].read_text()) is None
    config = load(cloud)
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        if cloud == "aws":
            arn = node_config["IamInstanceProfile"]["Arn"]
            assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), name
        else:
            (account,) = node_config["serviceAccounts"]
            assert account["email"].endswith(".iam.gserviceaccount.com"), name
            assert account["scopes"] == ["https://www.googleapis.com/auth/cloud-platform"], name


def test_aws_nodes_boot_a_gpu_driver_image_of_their_own() -> None:
    config = load("aws")
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        # an empty ImageId or latest_dlami gets Ray's default AMI (Ubuntu 18.04, too old a driver)
        assert node_config["ImageId"].startswith("ami-"), name
        (root,) = node_config["BlockDeviceMappings"]
        assert root["Ebs"]["VolumeSize"] >= 200, name


def test_gcp_gpu_vms_terminate_on_maintenance_and_boot_a_driver_image() -> None:
    config = load("gcp")
    zone = config["provider"]["availability_zone"]
    assert zone.startswith(config["provider"]["region"] + "-")
    for name, node_type in config["available_node_types"].items():
        (disk,) = node_type["node_config"]["disks"]
        params = disk["initializeParams"]
        assert params["diskSizeGb"] >= 200, name
        assert params["diskType"].startswith(f"zones/{zone}/diskTypes/"), name
        # the image's torch is a CUDA 13 build: NVIDIA driver 580 or newer
        assert re.fullmatch(
            r"projects/deeplearning-platform-release/global/images/family/common-cu\d+-ubuntu-\d+-nvidia-5[89]\d",
            params["sourceImage"],
        ), name
    for name, node_type in gpu_types(config).items():
        # the Compute API's Scheduling is an object; a list (as in some of Ray's examples) is refused
        assert node_type["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", name
