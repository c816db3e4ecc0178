"""k8s/: every kustomization renders (``kubectl kustomize``) to manifests that KubeRay v1.7.0's
CRDs accept with unknown fields rejected, and that say what the training needs: a real
``eerpipe train`` entrypoint whose ``train.num_workers`` equals the cluster's GPUs and whose
readers the default shards of the KVC corpora feed, NCCL settings on multi-node workers, a
cluster torn down after the job, credentials only from Secrets, nothing exposed outside
Kubernetes, and an image whose build checks its CUDA torch, NCCL and DeepSpeed.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import torch
import torch.distributed
import typer.main
import yaml

from pipeline.cli import app
from pipeline.config import TrainConfig
from pipeline.training.schedule import schedule_of
from sharding.format import Manifest, ShardInfo
from sharding.plan import plan_shards

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = K8S / "crds"  # KubeRay v1.7.0, vendored (k8s/crds/README.md)
RAYJOB_KUSTOMIZATIONS = ["base", "overlays/gpu-1node-8x", "overlays/gpu-4node-8x", "overlays/cpu-smoke"]
KUSTOMIZATIONS = [*RAYJOB_KUSTOMIZATIONS, "interactive"]
SECRET_NAMES = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.IGNORECASE)
GPU = "nvidia.com/gpu"
RDMA = "rdma/rdma_shared_device_a"  # the placeholder of k8s/components/nccl-rdma
# Users of the KVC-onGoing development sets (docs/design.md §2), each with about 15 sessions:
# what `eerpipe shard --source kvc:DATA:SCENARIO` splits and shards.
KVC_DEV_SET_USERS = {"desktop": 115_120, "mobile": 40_639}
KVC_SESSIONS_PER_USER = 15

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
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(),
                    Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = strict(OBJECT_META)
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft7Validator(schema)


def errors(manifest: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator(manifest["kind"]).iter_errors(manifest)]


@cache
def rendered(kustomization: str) -> tuple[dict[str, Any], ...]:
    """The manifests of a kustomization under k8s/ (or of a folder given by absolute path)."""
    output = subprocess.run(["kubectl", "kustomize", str(K8S / kustomization)],
                            capture_output=True, text=True, check=True).stdout
    return tuple(doc for doc in yaml.safe_load_all(output) if doc)


def user_overlay(folder: Path, resources: Sequence[Path], components: Sequence[Path] = (),
                 patches: Sequence[dict[str, Any]] = ()) -> str:
    """Write in ``folder`` the kustomization a user would write; return it for :func:`rendered`."""
    folder.mkdir(exist_ok=True)
    fields = {"resources": resources, "components": components}
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        **{key: [os.path.relpath(path, folder) for path in paths]  # kustomize refuses absolute paths
           for key, paths in fields.items() if paths},
        **({"patches": list(patches)} if patches else {})}))
    return str(folder)


@pytest.fixture(scope="module")
def rdma_overlay(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The base job with the RDMA component, which no shipped overlay includes."""
    return user_overlay(tmp_path_factory.mktemp("rdma"), [K8S / "base"], [K8S / "components/nccl-rdma"])


def one(kustomization: str, kind: str) -> dict[str, Any]:
    (manifest,) = [doc for doc in rendered(kustomization) if doc["kind"] == kind]
    return copy.deepcopy(manifest)


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def pod_templates(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster_spec(manifest)
    return [spec["headGroupSpec"]["template"], *(group["template"] for group in spec["workerGroupSpecs"])]


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, each on one line (continuations joined), without comments."""
    text = "\n".join(line for line in (K8S / "Dockerfile").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    return [" ".join(instruction.split()) for instruction in text.replace("\\\n", " ").splitlines()
            if instruction.strip()]


def image_workdir() -> Path:
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", (K8S / "Dockerfile").read_text(), re.MULTILINE)
    return Path(workdir)


def worker_container(job: dict[str, Any]) -> dict[str, Any]:
    """The container of the first GPU worker group, where Ray Train's ranks run."""
    return cluster_spec(job)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def config_map(kustomization: str, name: str) -> dict[str, str]:
    (data,) = [doc["data"] for doc in rendered(kustomization)
               if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name]
    return data


def config_maps_read_by(container: dict[str, Any]) -> list[str]:
    return [source["configMapRef"]["name"] for source in container.get("envFrom", []) if "configMapRef" in source]


@cache
def default_kvc_manifest(scenario: str) -> Manifest:
    """The manifest of a KVC dev set sharded with default options, planned without the data:
    the planner's shards, every user kept with 15 sessions."""
    plan = plan_shards([f"{user:08d}" for user in range(KVC_DEV_SET_USERS[scenario])], seed=0)
    shards = [ShardInfo(shard.name, shard.split, len(shard.subjects), KVC_SESSIONS_PER_USER * len(shard.subjects),
                        bytes=0, sha256="0" * 64) for shard in plan]
    return Manifest(source={"kind": "kvc", "scenario": scenario}, seed=0, shards=shards,
                    subjects={user: shard.name for shard in plan for user in shard.subjects})


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
def assert_valid_for_kuberay(kustomization: str, kind: str) -> None:
    kinds = [doc["kind"] for doc in rendered(kustomization)]
    assert [k for k in kinds if k != "ConfigMap"] == [kind] and "ConfigMap" in kinds
    for manifest in rendered(kustomization):
        if manifest["kind"] == "ConfigMap":
            assert all(isinstance(value, str) for value in manifest["data"].values())
        else:
            assert manifest["apiVersion"] == "ray.io/v1"
            assert errors(manifest) == []


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_manifest_is_valid_for_kuberay(kustomization: str) -> None:
    assert_valid_for_kuberay(kustomization, "RayCluster" if kustomization == "interactive" else "RayJob")


def test_the_rdma_component_renders_valid_for_kuberay(rdma_overlay: str) -> None:
    assert_valid_for_kuberay(rdma_overlay, "RayJob")


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
        return sum(group["replicas"]
                   * int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get(resource, 0))
                   for group in groups)

    if config.train.use_gpu:
        assert total(GPU) == config.train.num_workers
    else:
        assert total(GPU) == 0 and total("cpu") >= config.train.num_workers
        assert "DS_ACCELERATOR: cpu" in job["spec"]["runtimeEnvYAML"]
    assert config.run.storage.startswith("s3://") and config.data.shards.startswith("s3://")  # outlive the pods


@pytest.mark.parametrize("scenario", sorted(KVC_DEV_SET_USERS))
@pytest.mark.parametrize("kustomization", RAYJOB_KUSTOMIZATIONS)
def test_every_job_trains_on_the_default_shards_of_the_kvc_dev_sets(kustomization: str, scenario: str) -> None:
    config = entrypoint_config(one(kustomization, "RayJob")["spec"]["entrypoint"])
    manifest = default_kvc_manifest(scenario)
    train = manifest.shards_of("train")
    readers = config.train.num_workers * max(config.data.loader_workers, 1)
    assert len(train) >= readers, f"{len(train)} {scenario} train shards cannot feed {readers} readers"
    schedule = schedule_of(config, manifest)  # the check the launch runs: it refuses what it cannot fill
    # Readers with even shares: an epoch visits nearly every training subject (with the former
    # 1,000-subject shards, 79.5 % of KVC mobile's on one node, 54 % of desktop's on 16 GPUs).
    visited = schedule.steps_per_epoch * config.train.num_workers * config.data.subjects_per_batch
    assert visited >= 0.8 * sum(shard.samples for shard in train)


@pytest.mark.parametrize("scenario", sorted(KVC_DEV_SET_USERS))
def test_the_default_kvc_shards_leave_room_for_larger_clusters(scenario: str) -> None:
    assert len(default_kvc_manifest(scenario).shards_of("train")) >= 64 * 4  # 64 GPUs × 4 loader workers


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
def test_multi_node_jobs_give_their_gpu_workers_the_nccl_settings(kustomization: str) -> None:
    job = one(kustomization, "RayJob")
    nodes = sum(group["replicas"] for group in cluster_spec(job)["workerGroupSpecs"])
    reads_nccl = "eerpipe-nccl" in config_maps_read_by(worker_container(job))
    assert reads_nccl == (nodes > 1 and entrypoint_config(job["spec"]["entrypoint"]).train.use_gpu)
    head = cluster_spec(job)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "eerpipe-nccl" not in config_maps_read_by(head)  # the head trains nothing


def test_the_nccl_component_sets_sockets_and_the_rdma_one_infiniband(rdma_overlay: str) -> None:
    shared = {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert config_map("overlays/gpu-4node-8x", "eerpipe-nccl") == {**shared, "NCCL_IB_DISABLE": "1"}
    assert config_map(rdma_overlay, "eerpipe-nccl") == {**shared, "NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "mlx5"}
    assert RDMA not in worker_container(one("overlays/gpu-4node-8x", "RayJob"))["resources"]["limits"]  # off by default
    worker = worker_container(one(rdma_overlay, "RayJob"))
    assert worker["resources"]["requests"][RDMA] == worker["resources"]["limits"][RDMA] == "1"
    assert worker["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    assert "eerpipe-nccl" in config_maps_read_by(worker)


def test_the_nccl_component_refuses_a_worker_without_a_memory_shm(tmp_path: Path) -> None:
    disk_shm = {"op": "remove",
                "path": "/spec/rayClusterSpec/workerGroupSpecs/0/template/spec/volumes/0/emptyDir/medium"}
    without_shm = user_overlay(tmp_path / "without-shm", [K8S / "base"],
                               patches=[{"target": {"kind": "RayJob"}, "patch": yaml.safe_dump([disk_shm])}])
    overlay = user_overlay(tmp_path / "overlay", [Path(without_shm)], [K8S / "components/nccl-multinode"])
    result = subprocess.run(["kubectl", "kustomize", overlay], capture_output=True, text=True)
    assert result.returncode != 0 and "emptyDir/medium" in result.stderr and "test failed" in result.stderr


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
    templates = {doc["metadata"]["name"]: doc
                 for doc in (yaml.safe_load(p.read_text()) for p in (K8S / "secrets").glob("*.yaml"))}
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


def test_the_image_build_checks_cuda_torch_nccl_and_deepspeeds_accelerator() -> None:
    instructions = dockerfile_instructions()
    after_the_project = instructions[instructions.index("COPY --chown=ray . .") + 1:]
    (check,) = [instruction for instruction in after_the_project if instruction.startswith("RUN ")]
    assert "eerpipe --help" in check and "python k8s/check_image.py" in check
    script = (K8S / "check_image.py").read_text()
    for name in ("import torch.cuda", "torch.version.cuda", "torch.distributed.is_nccl_available()",
                 "from deepspeed.accelerator import get_accelerator"):
        assert name in script


def test_the_image_check_runs_without_a_gpu_and_fails_a_cpu_only_torch() -> None:
    result = subprocess.run([sys.executable, str(K8S / "check_image.py")], capture_output=True, text=True, cwd=ROOT)
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["torch", "torch.distributed:", "DeepSpeed"], result.stderr
    cuda, nccl, deepspeed = (line.startswith("ok") for line in lines)
    assert cuda == (torch.version.cuda is not None) and nccl == torch.distributed.is_nccl_available()
    assert deepspeed and lines[2].endswith("cuda, communication backend nccl")
    assert result.returncode == (0 if cuda and nccl else 1)
