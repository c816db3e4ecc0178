"""k8s/: every kustomization renders (``kubectl kustomize``) to manifests that KubeRay v1.7.0's
CRDs accept with unknown fields rejected, and that say what the training needs: a real
``eerpipe train`` entrypoint whose ``train.num_workers`` equals the cluster's GPUs, a cluster
torn down after the job, credentials only from Secrets, and nothing exposed outside Kubernetes.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import typer.main
import yaml

from pipeline.cli import app
from pipeline.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = K8S / "crds"  # KubeRay v1.7.0, vendored (k8s/crds/README.md)
RAYJOB_KUSTOMIZATIONS = ["base", "overlays/gpu-1node-8x", "overlays/gpu-4node-8x", "overlays/cpu-smoke"]
KUSTOMIZATIONS = [*RAYJOB_KUSTOMIZATIONS, "interactive"]
SECRET_NAMES = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.IGNORECASE)
GPU = "nvidia.com/gpu"

# The object metadata this project writes; the CRDs leave it open (the API server checks it).
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["name"],
}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever properties are listed."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: strict(value) for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed \
            and not closed.get("x-kubernetes-preserve-unknown-fields"):
        closed["additionalProperties"] = False
    return closed


@cache
def validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = strict(OBJECT_META)
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft7Validator(schema)


def errors(manifest: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(manifest["kind"]).iter_errors(manifest)]


@cache
def rendered(kustomization: str) -> tuple[dict[str, Any], ...]:
    output = subprocess.run(["kubectl", "kustomize", str(K8S / kustomization)],
                            capture_output=True, text=True, check=True).stdout
    return tuple(doc for doc in yaml.safe_load_all(output) if doc)


def one(kustomization: str, kind: str) -> dict[str, Any]:
    (manifest,) = [doc for doc in rendered(kustomization) if doc["kind"] == kind]
    return copy.deepcopy(manifest)


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def pod_templates(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster_spec(manifest)
    return [spec["headGroupSpec"]["template"], *(group["template"] for group in spec["workerGroupSpecs"])]


def image_workdir() -> Path:
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", (K8S / "Dockerfile").read_text(), re.MULTILINE)
    return Path(workdir)


def entrypoint_config(entrypoint: str) -> TrainConfig:
    """Parse ``eerpipe train …`` with the real CLI; load the config it names, as the image has it."""
    program, name, *args = shlex.split(entrypoint)
    assert program == "eerpipe"
    root = typer.main.get_command(app)
    context = root.make_context("eerpipe", [name])
    command = root.get_command(context, name)
    assert command is not None, f"eerpipe has no command {name!r}"
    assert name == "train"
    params = command.make_context(name, args, parent=context).params
    in_image = Path(params["config"])
    assert in_image.is_absolute(), "the job's working folder is not the image's: name the config by absolute path"
    return TrainConfig.load(ROOT / in_image.relative_to(image_workdir()), params["overrides"] or [])


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_manifest_is_valid_for_kuberay(kustomization: str) -> None:
    kinds = sorted(doc["kind"] for doc in rendered(kustomization))
    assert kinds == sorted(["ConfigMap", "RayCluster" if kustomization == "interactive" else "RayJob"])
    for manifest in rendered(kustomization):
        if manifest["kind"] == "ConfigMap":
            assert all(isinstance(value, str) for value in manifest["data"].values())
        else:
            assert manifest["apiVersion"] == "ray.io/v1"
            assert errors(manifest) == []


@pytest.mark.parametrize(
    "path, misspelling",
    [
        (("spec",), "shutdownAfterJobFinish"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0), "replica"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0), "resource"),
        (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "volumes", 0, "emptyDir"), "medum"),
        (("metadata",), "lables"),
    ],
)
def test_a_misspelled_field_is_rejected(path: tuple, misspelling: str) -> None:
    manifest = one("base", "RayJob")
    node = manifest
    for key in path:
        node = node[key]
    node[misspelling] = 1
    assert any(misspelling in error and "Additional properties" in error for error in errors(manifest))


# ---------------------------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kustomization", RAYJOB_KUSTOMIZATIONS)
def test_the_entrypoint_trains_with_one_worker_per_gpu(kustomization: str) -> None:
    job = one(kustomization, "RayJob")
    config = entrypoint_config(job["spec"]["entrypoint"])
    groups = cluster_spec(job)["workerGroupSpecs"]
    for group in groups:  # Ray Train's world size is fixed: no autoscaling of workers
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]

    def total(resource: str) -> int:
        return sum(group["replicas"] * int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get(resource, 0))
                   for group in groups)

    if config.train.use_gpu:
        assert total(GPU) == config.train.num_workers
    else:
        assert total(GPU) == 0 and total("cpu") >= config.train.num_workers
        assert "DS_ACCELERATOR: cpu" in job["spec"]["runtimeEnvYAML"]
    assert config.run.storage.startswith("s3://") and config.data.shards.startswith("s3://")  # outlive the pods


@pytest.mark.parametrize("kustomization", ["base", "overlays/gpu-4node-8x", "interactive"])
def test_gpu_workers_request_their_gpus_tolerate_gpu_nodes_and_get_a_memory_shm(kustomization: str) -> None:
    manifest = one(kustomization, "RayCluster" if kustomization == "interactive" else "RayJob")
    for group in cluster_spec(manifest)["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        assert int(resources["requests"][GPU]) == int(resources["limits"][GPU]) == 8
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for template in pod_templates(manifest):
        (shm,) = [v for v in template["spec"]["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert {"name": shm["name"], "mountPath": "/dev/shm"} in template["spec"]["containers"][0]["volumeMounts"]


@pytest.mark.parametrize("kustomization", RAYJOB_KUSTOMIZATIONS)
def test_the_rayjob_tears_its_cluster_down_after_the_job(kustomization: str) -> None:
    spec = one(kustomization, "RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_dashboard_and_job_api_stay_inside_the_cluster_behind_a_token(kustomization: str) -> None:
    for manifest in rendered(kustomization):
        assert manifest["kind"] not in ("Service", "Ingress", "Route", "Gateway")
        if manifest["kind"] in ("RayJob", "RayCluster"):
            spec = cluster_spec(manifest)
            assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
            assert not spec["headGroupSpec"].get("enableIngress", False)
            assert spec["authOptions"]["mode"] == "token"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_credentials_come_only_from_the_secret_templates_which_hold_no_values(kustomization: str) -> None:
    templates = {doc["metadata"]["name"]: doc for doc in (yaml.safe_load(p.read_text()) for p in (K8S / "secrets").glob("*.yaml"))}
    for template in templates.values():
        assert template["kind"] == "Secret" and set(template["stringData"].values()) == {""}
    for manifest in rendered(kustomization):
        assert manifest["kind"] != "Secret"
        if manifest["kind"] == "ConfigMap":
            assert not any(SECRET_NAMES.search(key) for key in manifest["data"])
            continue
        for template in pod_templates(manifest):
            for variable in template["spec"]["containers"][0]["env"]:
                assert "value" not in variable or not SECRET_NAMES.search(variable["name"])
                reference = variable.get("valueFrom", {}).get("secretKeyRef")
                if reference:
                    assert reference["key"] in templates[reference["name"]]["stringData"]
    token_secret = cluster_spec(one("interactive", "RayCluster"))["authOptions"]["secretName"]
    assert "auth_token" in templates[token_secret]["stringData"]


def test_no_file_under_k8s_holds_a_credential() -> None:
    credential = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY|[0-9a-f]{40}")
    for path in K8S.rglob("*"):
        if path.is_file():
            assert not credential.search(path.read_text()), path


def test_the_interactive_cluster_runs_the_pods_of_the_batch_job() -> None:
    batch, interactive = cluster_spec(one("base", "RayJob")), cluster_spec(one("interactive", "RayCluster"))
    for key in ("rayVersion", "headGroupSpec", "workerGroupSpecs"):
        assert interactive[key] == batch[key]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_image_is_the_projects_on_this_ray_version(kustomization: str) -> None:
    dockerfile = (K8S / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-py311" in dockerfile
    assert re.search(r"^COPY --chown=ray \. \.$", dockerfile, re.MULTILINE)  # /app/configs is the repo's configs/
    images = set()
    for manifest in rendered(kustomization):
        if manifest["kind"] in ("RayJob", "RayCluster"):
            assert cluster_spec(manifest)["rayVersion"] == ray.__version__
            images |= {template["spec"]["containers"][0]["image"] for template in pod_templates(manifest)}
    (image,) = images
    assert image.rsplit("/", 1)[-1].startswith("eerpipe:")
