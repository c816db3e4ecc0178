"""Training runs as Ray jobs: what is submitted, and how a run's jobs are found again.

A job runs ``eerpipe train --config eerpipe-job.yaml`` in a working folder that holds only
that file (the validated config, overrides applied); the project's packages travel as
``py_modules``, so the cluster runs the submitter's code and nothing else of the checkout
(.venv, runs, data, shards) is uploaded. The config is also kept in the job's metadata with
the run name: ``resume`` finds the run's latest job and submits its config again under the
same run name, and training picks up the run's latest checkpoint in ``run.storage``.

Secrets never travel with a job: Ray keeps each job's entrypoint, metadata and runtime
environment in its job table, which anyone with dashboard access can read. Credentials
(AWS keys, ``WANDB_API_KEY``) come from the cluster's own environment (Kubernetes Secrets,
see ``k8s/``); only the non-secret settings in :data:`PASS_THROUGH` are copied from the
submitter's environment, and they override the cluster's values of the same names.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

from jobs.errors import JobError
from pipeline.cluster import slug, worker_env
from pipeline.config import PATH_KEYS, TrainConfig

PASS_THROUGH = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_MODE",
    "WANDB_BASE_URL",
    "WANDB_INIT_TIMEOUT",
    "EERPIPE_S3_CONNECT_TIMEOUT",
    "EERPIPE_S3_READ_TIMEOUT",
    "EERPIPE_LOCK_LEASE",
    "AWS_MAX_ATTEMPTS",
)
PACKAGES = ("pipeline", "sharding", "jobs", "common")  # the distribution's packages (pyproject.toml)
CONFIG_FILE = "eerpipe-job.yaml"
RUN_KEY, CONFIG_KEY, RESUMED_KEY = "eerpipe_run", "eerpipe_config", "eerpipe_resumed_from"


@dataclass(frozen=True)
class JobRequest:
    """Everything ``JobSubmissionClient.submit_job`` receives for one training job."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


def job_request(
    config: TrainConfig,
    working_dir: str,
    environ: Mapping[str, str] = os.environ,
    resumed_from: str | None = None,
) -> JobRequest:
    """The job for ``config``, whose YAML is (or will be) ``working_dir/eerpipe-job.yaml``."""
    env_vars = {name: environ[name] for name in PASS_THROUGH if environ.get(name)}
    env_vars.update(worker_env(config.train.use_gpu))
    metadata = {RUN_KEY: config.run.name, CONFIG_KEY: _config_yaml(config)}
    if resumed_from:
        metadata[RESUMED_KEY] = resumed_from
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return JobRequest(
        submission_id=f"{slug(config.run.name)}-{stamp}-{uuid.uuid4().hex[:4]}",
        entrypoint=f"eerpipe train --config {CONFIG_FILE}",
        runtime_env={
            "working_dir": working_dir,
            "py_modules": [_package_dir(name) for name in PACKAGES],
            "excludes": ["__pycache__/", "*.pyc"],
            "env_vars": env_vars,
        },
        metadata=metadata,
    )


def _config_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise JobError(f"package {name!r} is not importable here: install the project (pip install -e .)")
    return spec.submodule_search_locations[0]


def submit(client: JobSubmissionClient, config: TrainConfig, resumed_from: str | None = None) -> str:
    """Submit a training job for ``config``; returns its submission id."""
    _check_paths(config)
    _refuse_if_active(client, config.run.name)
    with tempfile.TemporaryDirectory(prefix="eerpipe-job-") as folder:
        Path(folder, CONFIG_FILE).write_text(_config_yaml(config))
        request = job_request(config, folder, resumed_from=resumed_from)
        try:
            return client.submit_job(
                entrypoint=request.entrypoint,
                submission_id=request.submission_id,
                runtime_env=request.runtime_env,
                metadata=request.metadata,
            )
        except RuntimeError as error:
            raise JobError(f"the cluster refused job {request.submission_id}: {error}") from error


def resume(client: JobSubmissionClient, run: str, overrides: Sequence[str] = ()) -> str:
    """Submit run ``run`` again with the config of its latest job (``overrides`` applied)."""
    jobs = run_jobs(client.list_jobs(), run)
    if not jobs:
        raise JobError(
            f"this cluster has no job of run {run!r}; submit it with `eerpipe job submit --config FILE "
            f"--name {run}` (the same run name resumes from its checkpoints)"
        )
    previous = jobs[-1]
    with tempfile.TemporaryDirectory(prefix="eerpipe-resume-") as folder:
        path = Path(folder, CONFIG_FILE)
        path.write_text((previous.metadata or {})[CONFIG_KEY])
        config = TrainConfig.load(path, list(overrides))
    if config.run.name != run:
        raise JobError(f"resume keeps the run name {run!r}; to start another run, use `eerpipe job submit`")
    return submit(client, config, resumed_from=previous.submission_id)


def run_jobs(jobs: Sequence[JobDetails], run: str) -> list[JobDetails]:
    """The submitted jobs of run ``run``, oldest first."""
    mine = [job for job in jobs if job.submission_id and (job.metadata or {}).get(RUN_KEY) == run]
    return sorted(mine, key=lambda job: job.start_time or 0)


def find_job(client: JobSubmissionClient, ref: str) -> JobDetails:
    """The job whose submission id is ``ref``, else the latest job of run ``ref``."""
    jobs = client.list_jobs()
    for job in jobs:
        if job.submission_id == ref:
            return job
    of_run = run_jobs(jobs, ref)
    if of_run:
        return of_run[-1]
    raise JobError(f"no job or run named {ref!r} on this cluster (`eerpipe job list` shows them)")


def wait_for(
    client: JobSubmissionClient,
    submission_id: str,
    on_change: Callable[[JobStatus], None] = lambda status: None,
    poll_s: float = 1.0,
) -> JobDetails:
    """Block until the job ends; ``on_change`` sees each new status."""
    status = None
    while True:
        details = client.get_job_info(submission_id)
        if details.status != status:
            status = details.status
            on_change(status)
        if status.is_terminal():
            return details
        time.sleep(poll_s)


def follow_logs(client: JobSubmissionClient, submission_id: str, write: Callable[[str], Any]) -> None:
    """Stream the job's output to ``write`` until the job ends."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk)

    asyncio.run(tail())


def _check_paths(config: TrainConfig) -> None:
    """The driver runs in a temporary folder on the cluster: relative paths would land there."""
    settings = config.to_dict()
    for section, name in PATH_KEYS:
        key, value = f"{section}.{name}", settings[section][name]
        local = value.removeprefix("file://")
        if value and "://" not in local and not Path(local).is_absolute():
            raise JobError(
                f"{key}={value!r} is relative; a job needs an s3:// URL or a path the cluster's nodes see"
            )


def _refuse_if_active(client: JobSubmissionClient, run: str) -> None:
    """Two jobs of one run would write the same checkpoints."""
    for job in run_jobs(client.list_jobs(), run):
        if not job.status.is_terminal():
            raise JobError(
                f"run {run!r} already has job {job.submission_id} ({job.status}); "
                f"stop it first: eerpipe job stop {job.submission_id}"
            )
