"""``eerpipe job submit|status|logs|stop|list|resume``: training runs on a Ray cluster.

Ray and the job client are imported inside the commands, so ``eerpipe --help`` stays quick.
Every command takes ``--address`` (default ``$RAY_API_SERVER_ADDRESS``, then ``$RAY_ADDRESS``)
and authenticates with the cluster's token when one is found (see :mod:`jobs.client`); a call
the head does not answer within ``$EERPIPE_HEAD_TIMEOUT_S`` seconds (default 30) fails.
A job or run reference (REF) is a submission id or a run name (that run's latest job).
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Optional, cast

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from common.cli import clean_errors
from jobs.client import connect
from jobs.errors import JobError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

job_app = typer.Typer(
    help="Submit training runs to a Ray cluster (e.g. KubeRay) and follow, stop or resume them.",
    no_args_is_help=True,
)
_console = Console(highlight=False)
_status_console = Console(stderr=True, highlight=False)
_clean = clean_errors(JobError, ValueError, FileNotFoundError)

_ADDRESS = typer.Option(
    None, "--address", "-a",
    help="Job API: http://HEAD:8265 or ray://HEAD:10001 (default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS). "
    "A call the head does not answer within $EERPIPE_HEAD_TIMEOUT_S seconds (default 30) fails.",
)
_REF = typer.Argument(..., help="Submission id, or a run name (its latest job).")
_WAIT = typer.Option(False, "--wait", help="Block until the job ends; exit 1 unless it succeeded.")
_FOLLOW = typer.Option(False, "--follow", help="Stream the job's output until it ends (implies --wait).")
_OVERRIDES = typer.Argument(None, help="section.key=value overrides, e.g. train.epochs=3")


@job_app.command()
@_clean
def submit(
    config: Path = typer.Option(..., "--config", "-c", help="YAML training config (e.g. configs/gpu.yaml)."),
    overrides: Optional[list[str]] = _OVERRIDES,
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default: the config's run.name)."),
    address: Optional[str] = _ADDRESS,
    wait: bool = _WAIT,
    follow: bool = _FOLLOW,
) -> None:
    """Submit a training run; resubmitting the same run name resumes it from its checkpoints."""
    from jobs.submission import submit as submit_job
    from pipeline.cluster import check_run_name
    from pipeline.config import TrainConfig

    train_config = TrainConfig.load(config, overrides or [])
    if name is not None:  # "" too: an empty --name is refused, not taken for no --name
        train_config.run.name = check_run_name(name, "--name")
    client = connect(address)
    submission_id = submit_job(client, train_config)
    _console.print(f"submitted {submission_id} (run {train_config.run.name})")
    _conclude(client, submission_id, wait, follow)


@job_app.command()
@_clean
def resume(
    run: str = typer.Argument(..., help="Run name."),
    overrides: Optional[list[str]] = _OVERRIDES,
    address: Optional[str] = _ADDRESS,
    wait: bool = _WAIT,
    follow: bool = _FOLLOW,
) -> None:
    """Resubmit a run with its last job's config; training continues from its latest checkpoint."""
    from jobs.submission import resume as resume_run

    client = connect(address)
    submission_id = resume_run(client, run, overrides or [])
    _console.print(f"submitted {submission_id} (run {run}, resumed)")
    _conclude(client, submission_id, wait, follow)


@job_app.command()
@_clean
def status(ref: str = _REF, address: Optional[str] = _ADDRESS) -> None:
    """Status of a job: state, message, times, entrypoint."""
    from jobs.submission import RESUMED_KEY, RUN_KEY, find_job

    job = find_job(connect(address), ref)
    metadata = job.metadata or {}
    rows = {
        "job": job.submission_id,
        "run": metadata.get(RUN_KEY, ""),
        "status": str(job.status),
        "message": job.message or "",
        "started": _time(job.start_time),
        "ended": _time(job.end_time),
        "resumed from": metadata.get(RESUMED_KEY, ""),
        "entrypoint": job.entrypoint,
    }
    for key, value in rows.items():
        if value:
            _console.print(f"{key + ':':14}{value}", soft_wrap=True)


@job_app.command()
@_clean
def logs(
    ref: str = _REF,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
    address: Optional[str] = _ADDRESS,
) -> None:
    """The job's output (driver and training workers)."""
    from jobs.submission import find_job, follow_logs

    client = connect(address)
    job_id = cast(str, find_job(client, ref).submission_id)  # find_job returns submitted jobs only
    if follow:
        follow_logs(client, job_id, _write)
    else:
        _write(client.get_job_logs(job_id))


@job_app.command()
@_clean
def stop(ref: str = _REF, address: Optional[str] = _ADDRESS, wait: bool = _WAIT) -> None:
    """Stop a job; its run keeps its checkpoints and can be resumed."""
    from jobs.submission import find_job, wait_for

    client = connect(address)
    job = find_job(client, ref)
    job_id = cast(str, job.submission_id)  # find_job returns submitted jobs only
    if not client.stop_job(job_id):
        _console.print(f"{job_id} had already ended ({job.status})")
        return
    _console.print(f"stopping {job_id}")
    if wait:
        wait_for(client, job_id, _show_status)


@job_app.command("list")
@_clean
def list_jobs(address: Optional[str] = _ADDRESS) -> None:
    """Submitted jobs on the cluster, oldest first."""
    from jobs.submission import RUN_KEY

    jobs = sorted((job for job in connect(address).list_jobs() if job.submission_id),
                  key=lambda job: job.start_time or 0)
    table = Table(box=box.SIMPLE)
    table.add_column("job", no_wrap=True, min_width=max((len(job.submission_id or "") for job in jobs), default=3))
    for column in ("run", "status", "started", "ended"):
        table.add_column(column)
    for job in jobs:
        table.add_row(job.submission_id, (job.metadata or {}).get(RUN_KEY, ""), str(job.status),
                      _time(job.start_time), _time(job.end_time))
    _console.print(table)


def _conclude(client: "JobSubmissionClient", submission_id: str, wait: bool, follow: bool) -> None:
    """After a submission: stream and/or wait as asked, else say how to look later."""
    from ray.job_submission import JobStatus

    from jobs.submission import follow_logs, wait_for

    if follow:
        follow_logs(client, submission_id, _write)
    if not (wait or follow):
        _console.print(f"follow it with: eerpipe job logs --follow {submission_id}")
        return
    job: JobDetails = wait_for(client, submission_id, _show_status)
    if job.status != JobStatus.SUCCEEDED:
        raise JobError(f"job {submission_id} {job.status}: {job.message or 'no message'}")


def _show_status(status: object) -> None:
    _status_console.print(f"status: {status}")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _time(milliseconds: Optional[int]) -> str:
    return datetime.fromtimestamp(milliseconds / 1000).strftime("%m-%d %H:%M:%S") if milliseconds else ""


def register(app: typer.Typer) -> None:
    """Add ``eerpipe job …`` to the root app."""
    app.add_typer(job_app, name="job")
