"""``eerpipe synth``, ``eerpipe shard`` and ``eerpipe shards verify|stats``.

The writer and verifier are imported inside their commands: webdataset imports torch, which
``eerpipe --help`` and ``eerpipe synth`` should not wait for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from sharding.kvc import KVCFileError
from sharding.plan import DEFAULT_SUBJECTS_PER_SHARD, ShardingError
from sharding.sources import SPEC_HELP, SourceError
from sharding.storage import StorageError
from sharding.synth import ENROL_SESSIONS, SCENARIOS, write_kvc

_console = Console()
_errors = Console(stderr=True)
_EXPECTED = (KVCFileError, SourceError, StorageError, ShardingError, FileNotFoundError, ValueError)


def clean_errors(*expected: type[BaseException]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Expected failures end with one clear line on stderr and exit status 1, not a traceback."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except expected as error:
                _errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from error

        return run

    return decorate


_clean_errors = clean_errors(*_EXPECTED)


def _storage_options(endpoint_url: Optional[str], region: Optional[str]) -> dict[str, Any]:
    """s3fs options from flags; anything unset falls back to the AWS environment variables."""
    options: dict[str, Any] = {}
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


_ENDPOINT = typer.Option(None, "--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL).")
_REGION = typer.Option(None, "--region", help="S3 region (default: $AWS_REGION / $AWS_DEFAULT_REGION).")


@_clean_errors
def synth(
    out: Path = typer.Option(..., "--out", help="Data folder; files go to OUT/SCENARIO/."),
    scenario: str = typer.Option("desktop", help=f"One of {', '.join(SCENARIOS)}."),
    subjects: int = typer.Option(1000, help="Dev-set subjects (with labels)."),
    test_subjects: Optional[int] = typer.Option(
        None, help="Held-out evaluation subjects (default: max(2, subjects // 10))."),
    seed: int = typer.Option(0, help="Everything is a deterministic function of the seed."),
    difficulty: float = typer.Option(1.0, help="Scale of intra-subject variability (1.0 = calibrated)."),
    enrol_sessions: int = typer.Option(ENROL_SESSIONS, help="Enrolment sessions per evaluation subject."),
) -> None:
    """Write a synthetic corpus as KVC-onGoing files plus the comparisons' ground truth."""
    held_out = max(2, subjects // 10) if test_subjects is None else test_subjects
    paths = write_kvc(out, scenario=scenario, subjects=subjects, test_subjects=held_out,
                      seed=seed, difficulty=difficulty, enrol_sessions=enrol_sessions)
    for path in vars(paths).values():
        _console.print(f"wrote {path}", highlight=False)


@_clean_errors
def shard(
    source: str = typer.Option(..., "--source", help=SPEC_HELP),
    out: str = typer.Option(..., "--out", help="Folder, file:// or s3://bucket/prefix."),
    subjects_per_shard: int = typer.Option(DEFAULT_SUBJECTS_PER_SHARD, help="Subjects per tar."),
    workers: int = typer.Option(os.cpu_count() or 1, help="Worker processes."),
    seed: int = typer.Option(0, help="Seed of the subject split and shard assignment."),
    val_subjects: Optional[int] = typer.Option(None, help="Default: 10 % of the subjects, at most 1000."),
    test_subjects: Optional[int] = typer.Option(None, help="Default: 10 % of the subjects, at most 1000."),
    endpoint_url: Optional[str] = _ENDPOINT,
    region: Optional[str] = _REGION,
    progress: bool = typer.Option(True, help="Show a progress bar on stderr."),
) -> None:
    """Shard a corpus into subject-grouped WebDataset tars plus manifest.json (resumable)."""
    from sharding.writer import write_shards

    manifest = write_shards(source, out, seed=seed, subjects_per_shard=subjects_per_shard,
                            val_subjects=val_subjects, test_subjects=test_subjects,
                            workers=workers, progress=progress,
                            storage_options=_storage_options(endpoint_url, region))
    counts = {split: sum(s.samples for s in manifest.shards_of(split)) for split in ("train", "val", "test")}
    _console.print(f"{out}: {len(manifest.shards)} shards, subjects {counts}, "
                   f"rejected {manifest.rejected or 'none'}", highlight=False)


shards_app = typer.Typer(help="Inspect a committed shard set.", no_args_is_help=True)


@shards_app.command("verify")
@_clean_errors
def verify(url: str = typer.Argument(..., help="Folder, file:// or s3:// URL of the shard set."),
           endpoint_url: Optional[str] = _ENDPOINT, region: Optional[str] = _REGION) -> None:
    """Decode every shard and check counts and sha256 against the manifest (exit 1 on mismatch)."""
    from sharding.verify import verify_shards

    report = verify_shards(url, **_storage_options(endpoint_url, region))
    for problem in report.problems:
        _errors.print(f"[red]✗[/] {problem}", highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)
    _console.print(f"[green]✓[/] {report.shards} shards, {report.subjects} subjects, "
                   f"{report.sessions} sessions: all verify", highlight=False)


@shards_app.command("stats")
@_clean_errors
def stats(url: str = typer.Argument(..., help="Folder, file:// or s3:// URL of the shard set."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
          endpoint_url: Optional[str] = _ENDPOINT, region: Optional[str] = _REGION) -> None:
    """Subjects, sessions and keys per split; shard sizes; rejected counts."""
    from sharding.verify import shard_stats

    summary = shard_stats(url, **_storage_options(endpoint_url, region))
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    splits = Table("split", "shards", "subjects", "sessions", "keys", title="splits")
    for split, row in summary["splits"].items():
        splits.add_row(split, *(f"{row[k]:,}" for k in ("shards", "subjects", "sessions", "keys")))
    sizes = Table(*summary["shard_bytes"], title="shard bytes")
    sizes.add_row(*(f"{v:,.0f}" for v in summary["shard_bytes"].values()))
    rejected = Table("reason", "count", title="rejected")
    for reason, count in summary["rejected"].items():
        rejected.add_row(reason, f"{count:,}")
    for table in (splits, sizes, rejected):
        _console.print(table)


def register(app: typer.Typer) -> None:
    """Add the sharding stage's commands to the ``eerpipe`` root app."""
    app.command("synth")(synth)
    app.command("shard")(shard)
    app.add_typer(shards_app, name="shards")
