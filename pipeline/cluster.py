"""How a run meets Ray: the environment Ray and its workers need, where Ray stores a run, and
the names derived from a run's name (W&B run id, job submission ids, experiment arms).

One home for these, because the driver (``eerpipe train``), the job submitter (``jobs/``) and
the experiments must agree on them: a job whose workers lacked ``DS_ACCELERATOR=cpu`` or a
resumed run whose W&B id changed would fail far from the cause.

Ray reads its environment when first imported, so this module imports Ray only inside
functions and entry points call :func:`use_local_ray_settings` before importing it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

# A local cluster (demo, tests) stays on loopback and quiet; a real cluster's settings win.
LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP and MASTER_ADDR become 127.0.0.1
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",  # worker prints once, not twice
    # One machine has no node to be preempted; the watcher would be one more process at every launch.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Workers on loopback answer a poll at once: a run's start and end are seen in 0.5 s, not 2 s.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


class TrainingFailed(RuntimeError):
    """A run that failed on its workers (after Ray's retries): the worker's traceback is in Ray's
    log above; this is the one line that names the run, the rank and the cause."""


def use_local_ray_settings() -> None:
    """Apply :data:`LOCAL_RAY_ENV` unless a cluster address is set."""
    if not os.environ.get("RAY_ADDRESS"):
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Variables every training worker needs, wherever Ray runs it (local cluster or job)."""
    env = {"RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for CUDA and fail
    return env


def init_ray(use_gpu: bool = False) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (a Ray job, KubeRay), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_config=ray.LoggingConfig(log_level="ERROR"))
        return
    use_local_ray_settings()
    ray.init(
        address="local",
        include_dashboard=False,
        logging_config=ray.LoggingConfig(log_level="ERROR"),
        runtime_env={"env_vars": worker_env(use_gpu)},
    )


def ray_storage(url: str) -> tuple[str, Any]:
    """Ray's ``(storage_path, storage_filesystem)``: pyarrow ignores endpoint variables, so S3
    with a custom endpoint gets an explicit filesystem and a path without ``s3://``."""
    if not url.startswith("s3://"):
        return str(Path(url.removeprefix("file://")).resolve()), None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not endpoint:
        return url, None
    scheme, _, host = endpoint.rpartition("://")
    filesystem = pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme or "https", region=region or "us-east-1")
    return url.removeprefix("s3://"), filesystem


def checkpoint_url(checkpoint_path: str, storage: str) -> str:
    """A Ray checkpoint's path as a URL that ``--resume-from`` accepts (Ray drops ``s3://``)."""
    return f"s3://{checkpoint_path}" if storage.startswith("s3://") else checkpoint_path


RUN_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")


def check_run_name(name: str, key: str = "run.name") -> str:
    """``name`` if it can name a run, else a one-line error naming ``key`` (the setting or option).

    A run's files live in ``{run.storage}/{name}``: a path separator, ``.`` or ``..`` would put
    them in another run's folder or outside the storage, and a blank name in the storage itself.
    Letters, digits and ``_-+.`` cover every name eerpipe makes (experiment arms are
    ``eer+multisimilarity-<digest>``); a leading ``.`` is refused, which rules out ``.``, ``..``
    and hidden folders.
    """
    if not RUN_NAME.fullmatch(name):
        raise ValueError(
            f"{key} must be a folder name of letters, digits, '_', '-', '+' and '.', not starting "
            f"with '.', got {name!r}"
        )
    return name


def slug(name: str, limit: int = 60) -> str:
    """``name`` reduced to ``[A-Za-z0-9_-]`` (ids of W&B runs and Ray jobs allow no more)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:limit] or "run"


def wandb_run_id(storage: str, name: str) -> str:
    """Stable across relaunches of a run, so an online resumed run continues the same W&B run."""
    digest = hashlib.sha256(f"{storage}/{name}".encode()).hexdigest()[:8]
    return f"{slug(name, 48)}-{digest}"


def arm_run_name(loss: str, digest: str) -> str:
    """An experiment arm's run name: its loss and its config's digest, so a changed setting
    trains a new run and an identical arm of another experiment is the same run."""
    return f"{loss}-{digest}"
