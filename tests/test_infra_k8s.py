"""infra/k8s, lamina on Kubernetes with KubeRay, checked offline: no cluster, no kubectl.

Schemas. The core kinds (Namespace, ServiceAccount, Role, RoleBinding, the generated
ConfigMaps, the example Secret, the CronJob) go through the strict JSON schemas of
Kubernetes K8S_VERSION that the kubernetes-validate package ships; so does every pod template,
wrapped in a v1 PodTemplate. RayCluster and RayJob go through the openAPIV3Schema of KubeRay
v1.7.0's CRDs (vendored under tests/schemas, see its README), made into JSON Schema that
validates as the API server does by `kubernetes_semantics`. Broken copies are shown to fail.

Design. Every container runs the lamina image, on the Ray version of this environment. The
RayJob runs `lamina release` on the recipe its head mounts from ConfigMap lamina-recipe, in a
cluster that is the standing RayCluster's spec except for the GPU group the recipe pins, which
starts with the node its workers need (so the release starts without waiting for a scale-up).
The head takes no worker; the H100 and A100 groups of one 8-GPU node per pod scale from zero,
name their accelerator as infra/ray/cluster-*.yaml do and are what Ray's own autoscaler code
reads them to be. The CronJob creates the RayJob and lives until it ends (its script runs here
against a fake kubectl), so that concurrencyPolicy: Forbid forbids overlapping releases; its
account may only create and read RayJobs. Storage access comes from the pods' identity or an
optional Secret, never from a credential in a file.

`rayjob_entrypoint()` is imported by tests/test_job_submit.py: keep this module's imports light.
"""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_infra_docker import IMAGE

K8S = ROOT / "infra" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# The Kubernetes whose schemas check the core kinds: the oldest the scheduled release can run on,
# since the image's kubectl v1.34 works with API servers 1.33 to 1.35 (kubectl's skew policy).
K8S_VERSION = "1.33"
KUBERAY = "v1.7.0"
CRD_PLURALS = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}
NAMESPACE = "lamina"

# Status values of a RayJob, from ray-operator/apis/ray/v1/rayjob_types.go at KubeRay v1.7.0
# (the CRD leaves both fields plain strings).
JOB_DEPLOYMENT_STATUSES = {
    "",
    "Initializing",
    "Running",
    "Complete",
    "Failed",
    "ValidationFailed",
    "Suspending",
    "Suspended",
    "Retrying",
    "Waiting",
}
JOB_STATUSES = {"", "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"}

# nvidia.com/gpu.product, the label NVIDIA's GPU feature discovery puts on a node (the GPU
# operator runs it), for the GPUs of the machines infra/ray/cluster-*.yaml use.
GPU_PRODUCTS = {
    "NVIDIA-H100-80GB-HBM3": "accelerator_h100",
    "NVIDIA-A100-SXM4-40GB": "accelerator_a100",
    "NVIDIA-A100-SXM4-80GB": "accelerator_a100_80g",
}
# lamina plan's device profile for each accelerator.
PROFILES = {"accelerator_h100": "h100", "accelerator_a100": "a100-40gb", "accelerator_a100_80g": "a100"}
RAY_BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}
GIB = 2**30


# --- the manifests -------------------------------------------------------------------------


@functools.cache
def _parsed(name: str) -> tuple[dict, ...]:
    return tuple(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)


def load(name: str) -> list[dict]:
    """The documents of one file of infra/k8s (a fresh copy: tests may break it)."""
    return copy.deepcopy(list(_parsed(name)))


def kustomization() -> dict:
    (doc,) = load("kustomization.yaml")
    return doc


def generator_files(name: str) -> dict[str, Path]:
    """The files of one configMapGenerator entry, by their key in the ConfigMap."""
    (entry,) = [g for g in kustomization()["configMapGenerator"] if g["name"] == name]
    files = {}
    for spec in entry["files"]:
        key, _, path = spec.rpartition("=")  # `key=path`, or `path` (then the key is its file name)
        files[key or Path(path).name] = K8S / path
    return files


def generated_configmaps() -> list[dict]:
    """The ConfigMaps of the configMapGenerator, as kustomize writes them."""
    labels = kustomization().get("generatorOptions", {}).get("labels", {})
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": entry["name"], "namespace": NAMESPACE, "labels": dict(labels)},
            "data": {key: path.read_text() for key, path in generator_files(entry["name"]).items()},
        }
        for entry in kustomization()["configMapGenerator"]
    ]


def installed() -> list[dict]:
    """What `kubectl apply -k infra/k8s` installs."""
    return [d for name in kustomization()["resources"] for d in load(name)] + generated_configmaps()


def every_document() -> list[dict]:
    return installed() + load("rayjob.yaml") + load("storage-secret.example.yaml")


def the(kind: str, docs: list[dict] | None = None) -> dict:
    (doc,) = [d for d in (every_document() if docs is None else docs) if d["kind"] == kind]
    return doc


def ray_pods(spec: dict) -> dict[str, dict]:
    """The pod templates of a RayCluster spec by group: "head", then the worker groups."""
    pods = {"head": spec["headGroupSpec"]["template"]}
    pods.update({g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]})
    return pods


def pod_templates() -> dict[str, dict]:
    """Every pod template of the manifests, by where it is."""
    rayjob = the("RayJob")
    templates = {f"RayCluster {k}": v for k, v in ray_pods(the("RayCluster")["spec"]).items()}
    templates.update({f"RayJob {k}": v for k, v in ray_pods(rayjob["spec"]["rayClusterSpec"]).items()})
    templates["RayJob submitter"] = rayjob["spec"]["submitterPodTemplate"]
    templates["CronJob"] = the("CronJob")["spec"]["jobTemplate"]["spec"]["template"]
    return templates


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec["containers"] + pod_spec.get("initContainers", [])


def configmap_path(pod_spec: dict, configmap: str) -> str:
    """Where the pod's first container sees the file of a generated ConfigMap (mount path + key)."""
    (volume,) = [v for v in pod_spec.get("volumes", []) if v.get("configMap", {}).get("name") == configmap]
    (mount,) = [m for m in pod_spec["containers"][0].get("volumeMounts", []) if m["name"] == volume["name"]]
    (key,) = generator_files(configmap)
    items = {item["key"]: item["path"] for item in volume["configMap"].get("items", [])}
    assert "subPath" not in mount
    return f"{mount['mountPath'].rstrip('/')}/{items.get(key, key)}"


def rayjob_entrypoint() -> tuple[list[str], str]:
    """The RayJob's entrypoint as tokens, and the path of the recipe on its head (the mount
    path of ConfigMap lamina-recipe plus its key): tests/test_job_submit.py submits the same
    command with that token pointing at a recipe of its own."""
    (rayjob,) = load("rayjob.yaml")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    return rayjob["spec"]["entrypoint"].split(), configmap_path(head, "lamina-recipe")


def recipe():
    from pipeline.recipe import parse

    (key,) = generator_files("lamina-recipe").values()
    return parse(yaml.safe_load(key.read_text()), str(key))


def quantity(q: str | int) -> Decimal:
    """A Kubernetes quantity ("180", "500m", "1600Gi") as a number."""
    units = {"m": Decimal("0.001"), "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": GIB}
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q)).groups()
    return Decimal(number) * units[unit]


# --- validators ----------------------------------------------------------------------------


def kubernetes_semantics(node: dict) -> dict:
    """A node of a CRD's openAPIV3Schema (OpenAPI 3.0, JSON Schema draft 4 keywords) as JSON
    Schema that `jsonschema` validates the way the API server does:

    - `x-kubernetes-int-or-string: true`: an integer or a string, `anyOf` the two in place of any
      `type` (controller-gen writes that anyOf beside the extension already, so on KubeRay's CRDs
      this changes nothing; a bare extension would admit anything). A `pattern` beside it (the
      quantities') applies to strings only, in jsonschema as on the API server.
    - `nullable: true`: null is one of its types.
    - an object with `properties` and neither `additionalProperties` nor
      `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`: the API server
      drops unknown fields, and refuses them under strict field validation (kubectl's default
      since 1.25), so a misspelled field is an error here instead of silently ignored.
    - `x-kubernetes-list-type: set`: `uniqueItems`; `map`: no two items with the same
      `x-kubernetes-list-map-keys` (a keyword the validator below implements).

    Not evaluated: `x-kubernetes-validations` (CEL; test_no_cel_rule_of_the_crds_applies shows that
    the manifests set none of the fields that have one), `format` (int32, date-time) and
    defaults. Null in a non-nullable field is refused (the API server would prune it)."""
    if node.get("x-kubernetes-embedded-resource"):
        raise NotImplementedError("x-kubernetes-embedded-resource (apiVersion, kind, metadata allowed)")
    node = dict(node)
    for key in ("items", "not", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = kubernetes_semantics(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [kubernetes_semantics(n) for n in node[key]]
    if "properties" in node:
        node["properties"] = {name: kubernetes_semantics(n) for name, n in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in node:
        node["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-list-type") == "set":
        node["uniqueItems"] = True
    return node


def _unique_by_keys(validator, keys: list[str], instance: object, schema: dict):
    """The keyword `x-kubernetes-list-map-keys` for jsonschema: no two items alike in those keys."""
    import jsonschema

    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        if not isinstance(item, dict):
            continue
        key = json.dumps({k: item.get(k) for k in keys}, sort_keys=True)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry with { {k: item.get(k) for k in keys} }")
        seen.add(key)


def crd_schema(plural: str) -> dict:
    with gzip.open(SCHEMAS / f"kuberay-{KUBERAY}" / f"{plural}.json.gz") as f:
        return json.load(f)


@functools.cache
def crd_validator(plural: str):
    import jsonschema

    keywords = {"x-kubernetes-list-map-keys": _unique_by_keys}
    validator = jsonschema.validators.extend(jsonschema.Draft4Validator, keywords)
    return validator(kubernetes_semantics(crd_schema(plural)))


def crd_errors(doc: dict) -> list[str]:
    """What the API server would refuse in a RayCluster or RayJob (besides its metadata)."""
    errors = crd_validator(CRD_PLURALS[doc["kind"]]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def core_errors(doc: dict) -> list[str]:
    """What Kubernetes K8S_VERSION's strict schema refuses in a core document (the first error:
    kubernetes_validate.validate raises one)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


def errors(doc: dict) -> list[str]:
    if doc["kind"] not in CRD_PLURALS:
        return core_errors(doc)
    # The CRD schema leaves metadata to the API server: it is an ObjectMeta like any other.
    return crd_errors(doc) + core_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})


def as_pod_template(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


# --- schemas -------------------------------------------------------------------------------


MANIFESTS = (
    "namespace.yaml",
    "rbac.yaml",
    "raycluster.yaml",
    "cronjob.yaml",
    "rayjob.yaml",
    "storage-secret.example.yaml",
)


@pytest.mark.parametrize("name", MANIFESTS)
def test_each_manifest_validates_strictly(name) -> None:
    for doc in load(name):
        assert errors(doc) == [], doc["kind"]


def test_the_generated_configmaps_validate_strictly() -> None:
    for doc in generated_configmaps():
        assert errors(doc) == [], doc["metadata"]["name"]


def test_each_pod_template_validates_as_a_core_pod_template() -> None:
    templates = pod_templates()
    assert len(templates) == 2 * 4 + 2  # the head and 3 GPU groups twice, the RayJob's submitter, the CronJob's
    for where, template in templates.items():
        assert core_errors(as_pod_template(template)) == [], where


def rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def worker(doc: dict, index: int = 0) -> dict:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"][index]


# A broken copy of one manifest and the complaint it must get.
BROKEN = {
    "a misspelled worker group field": (
        "raycluster.yaml",
        lambda d: rename(worker(d), "maxReplicas", "maxReplica"),
        "'maxReplica' was unexpected",
    ),
    "a worker group without its maxReplicas": (
        "rayjob.yaml",
        lambda d: worker(d, 1).pop("maxReplicas"),
        "'maxReplicas' is a required property",
    ),
    "replicas of the wrong type": (
        "rayjob.yaml",
        lambda d: worker(d).update(replicas="one"),
        "'one' is not of type 'integer'",
    ),
    "a misspelled container field in a worker pod": (
        "raycluster.yaml",
        lambda d: rename(worker(d, 2)["template"]["spec"]["containers"][0], "resources", "resource"),
        "'resource' was unexpected",
    ),
    "a quantity that is neither an integer nor a string": (
        "raycluster.yaml",
        lambda d: worker(d)["template"]["spec"]["containers"][0]["resources"]["limits"].update(cpu=[180]),
        "is not valid under any of the given schemas",
    ),
    "a quantity Kubernetes cannot parse": (
        "rayjob.yaml",
        lambda d: worker(d)["template"]["spec"]["containers"][0]["resources"]["limits"].update(memory="1600GB"),
        "does not match",
    ),
    "a rayStartParams value that is not a string": (
        "raycluster.yaml",
        lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "0 is not of type 'string'",
    ),
    "two volumes of one name": (
        "raycluster.yaml",
        lambda d: worker(d)["template"]["spec"]["volumes"].append({"name": "dshm", "emptyDir": {}}),
        "duplicate entry with {'name': 'dshm'}",
    ),
    "a misspelled RayJob field": (
        "rayjob.yaml",
        lambda d: rename(d["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
        "'shutdownAfterJobFinish' was unexpected",
    ),
    "a misspelled field in the RayJob's metadata": (
        "rayjob.yaml",
        lambda d: rename(d["metadata"], "generateName", "generatName"),
        "'generatName' was unexpected",
    ),
    "an unknown field in the CronJob": (
        "cronjob.yaml",
        lambda d: d["spec"]["jobTemplate"]["spec"].update(backoffLimits=0),
        "'backoffLimits' was unexpected",
    ),
    "a misspelled Role field": (
        "rbac.yaml",
        lambda d: d["kind"] == "Role" and rename(d["rules"][0], "apiGroups", "apiGroup"),
        "'apiGroup' was unexpected",
    ),
}


@pytest.mark.parametrize("breakage", BROKEN)
def test_a_broken_copy_is_rejected(breakage) -> None:
    name, breaks, complaint = BROKEN[breakage]
    docs = load(name)
    for doc in docs:
        breaks(doc)
    assert any(complaint in e for doc in docs for e in errors(doc)), [errors(doc) for doc in docs]


def test_a_broken_pod_template_is_rejected_by_the_core_schema_too() -> None:
    (cluster,) = load("raycluster.yaml")
    template = worker(cluster)["template"]
    rename(template["spec"]["containers"][0], "volumeMounts", "volumeMount")
    assert any("'volumeMount' was unexpected" in e for e in core_errors(as_pod_template(template)))
    template = the("CronJob")["spec"]["jobTemplate"]["spec"]["template"]
    template["spec"]["containers"][0]["resources"]["limits"]["cpu"] = {"cores": 1}
    assert core_errors(as_pod_template(template)) != []


def test_kubernetes_semantics_of_a_crd_schema() -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "quantity": {"x-kubernetes-int-or-string": True, "pattern": "^[0-9]+(Gi)?$"},
            "when": {"type": "string", "nullable": True},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
            "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
            "ports": {
                "type": "array",
                "items": {"type": "object", "properties": {"name": {"type": "string"}, "port": {"type": "integer"}}},
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
            },
        },
    }
    validator = jsonschema.validators.extend(
        jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _unique_by_keys}
    )(kubernetes_semantics(schema))
    good = [{"quantity": 8}, {"quantity": "8Gi"}, {"when": None}, {"free": {"b": 1}}, {"tags": ["a", "b"]}]
    good += [{"ports": [{"name": "a", "port": 1}, {"name": "b", "port": 1}]}]
    bad = [{"quantity": 1.5}, {"quantity": "8GB"}, {"quantity": [8]}, {"unknown": 1}, {"tags": ["a", "a"]}]
    bad += [{"ports": [{"name": "a", "port": 1}, {"name": "a", "port": 2}]}, {"ports": [{"nme": "a"}]}]
    assert [validator.is_valid(d) for d in good] == [True] * len(good)
    assert [validator.is_valid(d) for d in bad] == [False] * len(bad)
    # what a quantity may be in the vendored CRDs too: an integer as well as a string
    (cluster,) = load("raycluster.yaml")
    worker(cluster)["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 180
    assert crd_errors(cluster) == []


@pytest.mark.parametrize("kind", CRD_PLURALS)
def test_the_vendored_schemas_are_kuberays_v1(kind) -> None:
    schema = crd_schema(CRD_PLURALS[kind])
    assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    spec = schema["properties"]["spec"]["properties"]
    assert {"headGroupSpec", "workerGroupSpecs"} <= set(spec) or {"entrypoint", "rayClusterSpec"} <= set(spec)
    readme = (SCHEMAS / "README.md").read_text()
    assert KUBERAY in readme and "59d663aeec13760646da3db9c1cf8cfe883e30b7" in readme and "Apache-2.0" in readme


def cel_paths(node: dict, path: tuple = ()) -> list[tuple]:
    """Where a schema has CEL rules (x-kubernetes-validations); "[]" stands for any list item."""
    found = [path] if "x-kubernetes-validations" in node else []
    for name, child in node.get("properties", {}).items():
        found += cel_paths(child, (*path, name))
    if isinstance(node.get("items"), dict):
        found += cel_paths(node["items"], (*path, "[]"))
    return found


def present(doc: object, path: tuple) -> bool:
    if not path:
        return True
    if path[0] == "[]":
        return isinstance(doc, list) and any(present(item, path[1:]) for item in doc)
    return isinstance(doc, dict) and path[0] in doc and present(doc[path[0]], path[1:])


@pytest.mark.parametrize("kind", CRD_PLURALS)
def test_no_cel_rule_of_the_crds_applies(kind) -> None:
    """The CEL rules are not evaluated here: they guard only fields the manifests leave unset."""
    paths = cel_paths(crd_schema(CRD_PLURALS[kind]))
    assert paths, kind
    assert [p for p in paths if present(the(kind), p)] == []


# --- design --------------------------------------------------------------------------------


def test_every_container_runs_the_lamina_image() -> None:
    for where, template in pod_templates().items():
        for container in containers(template["spec"]):
            assert container["image"] == IMAGE, where


def test_ray_on_the_cluster_is_the_ray_of_this_environment() -> None:
    version = importlib.metadata.version("ray")
    assert the("RayCluster")["spec"]["rayVersion"] == version
    assert the("RayJob")["spec"]["rayClusterSpec"]["rayVersion"] == version  # the image's: test_infra_docker


def test_the_rayjob_releases_the_recipe_its_head_mounts() -> None:
    tokens, recipe_path = rayjob_entrypoint()
    assert tokens[:2] == ["lamina", "release"]
    assert tokens.count(recipe_path) == 1 and tokens[-1] == recipe_path
    assert shlex.split(the("RayJob")["spec"]["entrypoint"]) == tokens  # no quoting for a shell to undo
    # the standing cluster's head mounts it at the same place, for `ray job submit`
    standing_head = the("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    assert configmap_path(standing_head, "lamina-recipe") == recipe_path
    head = the("RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if recipe_path.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True


def test_the_generated_configmaps_hold_the_recipe_and_the_rayjob() -> None:
    generation = kustomization()
    assert generation["generatorOptions"]["disableNameSuffixHash"] is True  # referred to by name
    assert {g["name"] for g in generation["configMapGenerator"]} == {"lamina-recipe", "lamina-rayjob"}
    for name in ("lamina-recipe", "lamina-rayjob"):
        for path in generator_files(name).values():
            assert path.is_file() and path.parent == K8S, path
    assert generator_files("lamina-rayjob") == {"rayjob.yaml": K8S / "rayjob.yaml"}
    recipe()  # parses as a lamina recipe (pipeline.recipe.parse: pydantic, no storage access)


def test_the_recipe_is_a_release_of_a_70b_model() -> None:
    r = recipe()
    assert re.fullmatch(r"s3://[A-Z-]+/meta-llama/Llama-3\.1-70B", r.model)
    assert re.fullmatch(r"s3://[A-Z-]+/llama-3\.1-70b/w4g128-v\d+", r.output)  # REGISTRY/<model>/<version>
    assert r.calibration.source.startswith("s3://") and r.eval.source.startswith("s3://")
    assert r.eval.source != r.calibration.source
    assert (r.scheme.algorithm, r.scheme.bits, r.scheme.group_size) == ("gptq", 4, 128)
    assert None not in (r.gates.max_ppl_increase, r.gates.max_kl, r.gates.min_top1)
    assert r.resources.gpus_per_worker == 1 and r.storage == {}


def autoscaler_view(spec: dict) -> dict:
    """The autoscaling config Ray's autoscaler derives from a RayCluster spec (its own code, as
    it runs in the head pod; it also validates the config with Ray's schema)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"metadata": {"name": "lamina", "namespace": NAMESPACE}, "spec": copy.deepcopy(spec)}
    return _derive_autoscaling_config_from_ray_cr(cr)


def seats(bundle: dict[str, float], resources: dict[str, float]) -> int:
    """How many workers of one bundle a node of these resources can hold."""
    return min(int(resources.get(key, 0) // amount) for key, amount in bundle.items())


def test_the_rayjob_cluster_seats_the_recipe_at_start() -> None:
    """The RayJob's cluster starts with exactly the recipe's nodes: its workers are placed at
    once, with no scale-up to wait for and no idle GPU node."""
    r = recipe().resources
    spec = the("RayJob")["spec"]["rayClusterSpec"]
    types = autoscaler_view(spec)["available_node_types"]
    start = {g["groupName"]: g.get("replicas", 0) for g in spec["workerGroupSpecs"]}
    (pinned,) = [name for name, t in types.items() if seats(r.bundle(), t["resources"])]
    assert set(r.custom) <= set(types[pinned]["resources"]) - RAY_BUILTIN
    assert {name for name, n in start.items() if n} == {pinned}
    nodes = start[pinned]
    assert nodes * seats(r.bundle(), types[pinned]["resources"]) >= r.workers
    assert (nodes - 1) * seats(r.bundle(), types[pinned]["resources"]) < r.workers  # no idle GPU node
    assert r.workers * r.cpus_per_worker <= nodes * types[pinned]["resources"]["CPU"]


def test_the_plan_of_the_recipe_fits_its_workers_and_the_rayjob_deadline() -> None:
    """`lamina plan` of the recipe (Llama-3.1-70B has Llama-3-70B's shapes, tests/configs)."""
    from pipeline import estimate as est

    r = recipe()
    (accelerator,) = r.resources.custom
    shape = est.ModelShape.from_config(json.loads((ROOT / "tests" / "configs" / "llama-3-70b.json").read_text()))
    run = est.estimate(
        shape,
        est.load_profile(PROFILES[accelerator]),
        workers=r.resources.workers,
        tokens=r.calibration.tokens,
        seq_len=r.calibration.seq_len,
        chunk_tokens=r.calibration.chunk_size * r.calibration.seq_len,
        solve_rows=r.scheme.piece_rows,
        spill=r.resources.spill is not None,
        solve_device=r.resources.solve_device,
        inverse_on_cpu=r.resources.inverse_on_cpu,
    )
    est.check_fits(run)
    assert run.worker.peak_of("host") <= r.resources.memory_per_worker_gib * GIB
    # quantization within 3/4 of the RayJob's deadline, the rest for the eval and publishing
    assert run.seconds <= 0.75 * the("RayJob")["spec"]["activeDeadlineSeconds"]


def test_the_rayjob_cluster_is_the_standing_cluster_but_for_its_start() -> None:
    standing = the("RayCluster")["spec"]
    job = the("RayJob")["spec"]["rayClusterSpec"]
    standing_start = {g["groupName"]: g.pop("replicas") for g in standing["workerGroupSpecs"]}
    assert standing_start == dict.fromkeys(standing_start, 0)  # GPU nodes only while a run needs them
    for group in job["workerGroupSpecs"]:
        group.pop("replicas")
    assert job == standing


def test_a_rayjob_per_release_ends_and_cleans_up() -> None:
    rayjob = the("RayJob")
    spec = rayjob["spec"]
    assert "name" not in rayjob["metadata"]
    # KubeRay refuses RayJob names over 47 characters; the API server adds 5 to generateName
    assert re.fullmatch(r"[a-z]([-a-z0-9]*)-", rayjob["metadata"]["generateName"])
    assert len(rayjob["metadata"]["generateName"]) + 5 <= 47
    assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 3600
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] >= 12 * 3600  # a 70B release takes about 10 h
    assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"  # the mode submitterPodTemplate is for
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"  # a Job's pod
    assert "deletionStrategy" not in spec  # incompatible with shutdownAfterJobFinishes


def cron_pod() -> dict:
    return the("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def cron_script() -> str:
    (container,) = cron_pod()["containers"]
    assert container["command"] == ["bash", "-c"]
    (script,) = container["args"]
    return script


def test_the_schedule_forbids_overlapping_releases() -> None:
    cron = the("CronJob")["spec"]
    job = cron["jobTemplate"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["startingDeadlineSeconds"] > 0
    assert cron["successfulJobsHistoryLimit"] >= 1 and cron["failedJobsHistoryLimit"] >= 1
    assert job["backoffLimit"] == 0  # a retry would create a second RayJob
    assert job["activeDeadlineSeconds"] > the("RayJob")["spec"]["activeDeadlineSeconds"]
    assert cron_pod()["restartPolicy"] == "Never"


def test_the_schedule_creates_the_rayjob_it_mounts_and_waits_for_both_statuses() -> None:
    script = cron_script()
    assert script.startswith("set -euo pipefail\n")
    (create,) = [line for line in script.splitlines() if "kubectl create" in line]
    args = shlex.split(create.split("$(", 1)[1].rstrip(")"))
    assert args[args.index("-f") + 1] == configmap_path(cron_pod(), "lamina-rayjob")
    terminal = set(re.search(r"\^\(([\w|]+)\)\$", script).group(1).split("|"))
    assert {"Complete", "Failed"} <= terminal <= JOB_DEPLOYMENT_STATUSES
    assert ".status.$1" in script and "field jobDeploymentStatus" in script and "field jobStatus" in script
    assert re.findall(r"== (\w+) ]]", script) == ["SUCCEEDED"] and "SUCCEEDED" in JOB_STATUSES


FAKE_KUBECTL = """#!/usr/bin/env bash
# kubectl for the CronJob's script: `create` names a RayJob, `get` answers the next line of
# $FAKE/states for jobDeploymentStatus ("!" fails like an API server blip) and $FAKE/status for jobStatus.
echo "$*" >> "$FAKE/calls"
case "$1" in
  create) echo rayjob.ray.io/lamina-release-x2k9q ;;
  get)
    if [[ "$*" == *jobDeploymentStatus* ]]; then
      n=$(( $(wc -l < "$FAKE/answered") + 1 )); echo >> "$FAKE/answered"
      state=$(sed -n "${n}p" "$FAKE/states")
      if [[ "$state" == "!" ]]; then echo "connection refused" >&2; exit 1; fi
      printf %s "$state"
    else
      printf %s "$(cat "$FAKE/status")"
    fi ;;
esac
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    "states, status, code",
    [
        (["", "Initializing", "Running", "!", "Running", "Complete"], "SUCCEEDED", 0),
        (["Initializing", "Running", "Complete"], "FAILED", 1),
        (["Initializing", "Failed"], "", 1),
        (["ValidationFailed"], "", 1),
        (["Running"] + ["!"] * 10, "", 1),
    ],
)
def test_the_schedule_succeeds_only_when_the_ray_job_succeeded(tmp_path, states, status, code) -> None:
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.parent.mkdir()
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    (tmp_path / "status").write_text(status)
    (tmp_path / "answered").write_text("")
    env = {**os.environ, "PATH": f"{kubectl.parent}:{os.environ['PATH']}", "FAKE": str(tmp_path)}
    env.update(NAMESPACE=NAMESPACE, POLL_SECONDS="0")
    done = subprocess.run(["bash", "-c", cron_script()], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stdout + done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == f"create -n {NAMESPACE} -f {configmap_path(cron_pod(), 'lamina-rayjob')} -o name"
    assert all(c.startswith(f"get -n {NAMESPACE} rayjob.ray.io/lamina-release-x2k9q -o jsonpath=") for c in calls[1:])


def test_the_submitter_may_only_create_and_read_rayjobs() -> None:
    docs = load("rbac.yaml")
    role, binding = the("Role", docs), the("RoleBinding", docs)
    (rule,) = role["rules"]
    assert (rule["apiGroups"], rule["resources"]) == (["ray.io"], ["rayjobs"])
    used = set(re.findall(r"kubectl (\w+)", cron_script()))
    assert used == {"create", "get"} and used <= set(rule["verbs"]) <= {"create", "get", "list", "watch"}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lamina-submitter"}
    assert role["metadata"]["name"] == "lamina-submitter"
    account = cron_pod()["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert account == "lamina-submitter" and accounts == {"lamina", "lamina-submitter"}


CREDENTIAL_NAME = re.compile(r"SECRET|KEY|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
CREDENTIAL_VALUE = re.compile(r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|-----BEGIN|\"private_key\"|ghp_[0-9A-Za-z]{20}")


def test_storage_access_comes_from_the_pod_identity_or_the_optional_secret() -> None:
    (account,) = [d for d in load("rbac.yaml") if d["metadata"]["name"] == "lamina"]
    notes = account["metadata"]["annotations"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", notes["eks.amazonaws.com/role-arn"])
    assert re.fullmatch(r"[a-z][-a-z0-9]*@[\w-]+\.iam\.gserviceaccount\.com", notes["iam.gke.io/gcp-service-account"])
    optional_secret = {"secretRef": {"name": "lamina-storage", "optional": True}}
    for spec in (the("RayCluster")["spec"], the("RayJob")["spec"]["rayClusterSpec"]):
        for group, pod in ray_pods(spec).items():
            assert pod["spec"]["serviceAccountName"] == "lamina", group
            assert optional_secret in pod["spec"]["containers"][0]["envFrom"], group


def test_no_file_holds_a_credential() -> None:
    for where, template in pod_templates().items():
        for container in containers(template["spec"]):
            for env in container.get("env", []):
                assert not (CREDENTIAL_NAME.search(env["name"]) and "value" in env), (where, env["name"])
    for path in K8S.iterdir():
        assert CREDENTIAL_VALUE.search(path.read_text()) is None, path
    secret = the("Secret")
    assert secret["metadata"]["name"] == "lamina-storage"
    assert set(secret.get("stringData", {}).values()) | set(secret.get("data", {}).values()) <= {""}
    assert "storage-secret.example.yaml" not in kustomization()["resources"]
    assert "Secret" not in {d["kind"] for d in installed()}


def test_the_head_takes_no_worker() -> None:
    from pipeline.recipe import parse

    smallest = parse({"model": "s3://b/m", "output": "s3://b/o", "resources": {"cpus_per_worker": 0.01}})
    for spec in (the("RayCluster")["spec"], the("RayJob")["spec"]["rayClusterSpec"]):
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        assert not any("gpu" in r for r in head["template"]["spec"]["containers"][0]["resources"]["limits"])
        resources = autoscaler_view(spec)["available_node_types"]["headgroup"]["resources"]
        assert resources["CPU"] == 0 and "GPU" not in resources
        assert seats(smallest.resources.bundle(), resources) == 0


def launcher_machines() -> dict[str, dict]:
    """The Ray resources infra/ray/cluster-*.yaml give each machine type."""
    machines = {}
    for path in sorted((ROOT / "infra" / "ray").glob("cluster-*.yaml")):
        for node_type in yaml.safe_load(path.read_text())["available_node_types"].values():
            config = node_type["node_config"]
            machines[config.get("InstanceType") or config.get("machineType")] = node_type["resources"]
    return machines


def affinity_values(pod_spec: dict, label: str) -> list[str]:
    terms = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expression,) = [e for t in terms for e in t["matchExpressions"] if e["key"] == label]
    assert expression["operator"] == "In"
    return expression["values"]


def kuberay_resources(value: str) -> dict:
    """The custom resources as KubeRay's operator reads rayStartParams.resources
    (getResourcesMap in ray-operator/controllers/ray/common/pod.go: trim quotes, then JSON)."""
    return json.loads(value.strip("'\"` "))


@pytest.mark.parametrize("kind", CRD_PLURALS)
def test_gpu_groups_of_one_8_gpu_node_per_pod_scale_from_zero(kind) -> None:
    spec = the(kind)["spec"].get("rayClusterSpec", the(kind)["spec"])
    types = autoscaler_view(spec)["available_node_types"]
    machines = launcher_machines()
    accelerators = set()
    for group in spec["workerGroupSpecs"]:
        name, pod = group["groupName"], group["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "8", name
        assert resources["limits"] == resources["requests"], name  # Guaranteed QoS: evicted last
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, name
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], name
        ray = types[name]["resources"]
        (accelerator,) = set(ray) - RAY_BUILTIN
        accelerators.add(accelerator)
        assert ray[accelerator] == ray["GPU"] == 8, name
        # the same custom resource for KubeRay's operator, and for `ray start` after the shell
        custom = group["rayStartParams"]["resources"]
        assert kuberay_resources(custom) == {accelerator: 8}, name
        (flag,) = shlex.split(f"--resources={custom}")
        assert json.loads(flag.split("=", 1)[1]) == {accelerator: 8}, name
        assert {GPU_PRODUCTS[p] for p in affinity_values(pod, "nvidia.com/gpu.product")} == {accelerator}, name
        for machine in affinity_values(pod, "node.kubernetes.io/instance-type"):
            launcher = machines[machine]
            assert accelerator in launcher and launcher["GPU"] == 8, (name, machine)
            assert ray["CPU"] <= launcher["CPU"] and ray["memory"] <= launcher["memory"], (name, machine)
        # Ray's memory plus its object store (30% of the pod's, at most 200 GB) leave the system room
        limit = quantity(resources["limits"]["memory"])
        assert ray["memory"] + min(Decimal("0.3") * limit, 200 * 10**9) <= Decimal("0.95") * limit, name
    assert {"accelerator_h100", "accelerator_a100"} <= accelerators


def test_every_ray_pod_has_a_memory_backed_dev_shm() -> None:
    for where, template in pod_templates().items():
        if where.startswith("Ray") and "submitter" not in where:
            pod = template["spec"]
            (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            assert volume["emptyDir"]["medium"] == "Memory", where


def test_kuberay_operator_rules() -> None:
    """Checks of ray-operator/controllers/ray/utils/validation.go (v1.7.0) that are not in the CRD."""
    for spec in (the("RayCluster")["spec"], the("RayJob")["spec"]["rayClusterSpec"]):
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert not (group.get("resources") and set(group["rayStartParams"]) & {"num-cpus", "memory", "resources"})
            assert "labels" not in group["rayStartParams"]
            assert group["template"]["spec"]["containers"]
            assert group["template"]["spec"].get("restartPolicy", "Never") == "Never"  # autoscaler v2
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert len({g["groupName"] for g in spec["workerGroupSpecs"]}) == len(spec["workerGroupSpecs"])
    assert len(the("RayCluster")["metadata"]["name"]) <= 53


def test_the_kustomization_installs_everything_but_the_one_off_rayjob() -> None:
    k = kustomization()
    assert k["namespace"] == NAMESPACE
    assert k["resources"] == ["namespace.yaml", "rbac.yaml", "raycluster.yaml", "cronjob.yaml"]
    assert all((K8S / name).is_file() for name in k["resources"])
    assert the("Namespace", installed())["metadata"]["name"] == NAMESPACE
    for doc in installed():
        assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE, doc["kind"]
    generated = {p.name for name in ("lamina-recipe", "lamina-rayjob") for p in generator_files(name).values()}
    known = {"kustomization.yaml", "storage-secret.example.yaml", *k["resources"], *generated}
    assert {p.name for p in K8S.iterdir()} == known  # no manifest left out by mistake


HEADERS = {
    "kustomization.yaml": "kubectl apply -k infra/k8s",
    "rayjob.yaml": "kubectl create -n lamina -f infra/k8s/rayjob.yaml",
    "cronjob.yaml": "kubectl create job --from=cronjob/lamina-release lamina-release-now -n lamina",
    "raycluster.yaml": "kubectl apply -k infra/k8s",
    "namespace.yaml": "kubectl apply -k infra/k8s",
    "rbac.yaml": "kubectl apply -k infra/k8s",
    "storage-secret.example.yaml": "kubectl apply -n lamina -f",
    "recipe.yaml": "kubectl create -n lamina -f infra/k8s/rayjob.yaml",
}


@pytest.mark.parametrize("name", HEADERS)
def test_each_file_says_what_it_is_and_how_to_use_it(name) -> None:
    text = (K8S / name).read_text()
    header = text[: text.index("\n" + next(line for line in text.splitlines() if not line.startswith("#")))]
    assert header.startswith("# ") and HEADERS[name] in header
    assert "\t" not in text
