"""``eerpipe synth``, ``eerpipe shard`` and ``eerpipe shards verify|stats``.

The writer and verifier are imported inside their commands: webdataset imports torch, which
``eerpipe --help`` and ``eerpipe synth`` should not wait for.
"""

from __future__ import annotations

import json
import os
import shlex
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from common.cli import clean_errors, print_error
from sharding.format import SPLITS
from sharding.kvc import KVCFileError
from sharding.plan import MAX_SUBJECTS_PER_SHARD, MIN_SHARDS, ShardingError
from sharding.source_spec import SPEC_HELP
from sharding.sources import SourceError
from sharding.storage import StorageError
from sharding.synth import ENROL_SESSIONS, SCENARIOS, write_kvc

# clean_errors is re-exported for pipeline/cli.py and jobs/cli.py until they import common.cli.
__all__ = ["clean_errors", "register"]

_console = Console()
_EXPECTED = (KVCFileError, SourceError, StorageError, ShardingError, FileNotFoundError, ValueError)
_clean_errors = clean_errors(*_EXPECTED)
_SHOWN_REJECTS = 3

# choices for --split; mypy cannot list the members of an Enum built from a dict comprehension
Split = Enum("Split", {name: name for name in SPLITS}, type=str)  # type: ignore[misc]


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
    dev_set: bool = typer.Option(True, "--dev-set/--no-dev-set",
                                 help="--no-dev-set: the evaluation files only (shard the dev subjects with "
                                      "--source synth:SUBJECTS:SEED instead)."),
) -> None:
    """Write a synthetic corpus as KVC-onGoing files plus the comparisons' ground truth."""
    held_out = max(2, subjects // 10) if test_subjects is None else test_subjects
    paths = write_kvc(out, scenario=scenario, subjects=subjects, test_subjects=held_out,
                      seed=seed, difficulty=difficulty, enrol_sessions=enrol_sessions, dev_set=dev_set)
    for path in vars(paths).values():
        if dev_set or path != paths.dev_set:
            _console.print(f"wrote {path}", highlight=False)


@_clean_errors
def shard(
    source: str = typer.Option(..., "--source", help=SPEC_HELP),
    out: str = typer.Option(..., "--out", help="Folder, file:// or s3://bucket/prefix."),
    subjects_per_shard: Optional[int] = typer.Option(
        None, min=1, help=f"Subjects per tar (default: automatic, at most {MAX_SUBJECTS_PER_SHARD}, "
        f"at least {MIN_SHARDS['train']} train and {MIN_SHARDS['val']} val/test shards when "
        "the subjects allow)."),
    workers: int = typer.Option(os.cpu_count() or 1, min=1, help="Worker processes."),
    seed: int = typer.Option(0, help="Seed of the subject split and shard assignment."),
    val_subjects: Optional[int] = typer.Option(None, min=0, help="Default: 10 % of the subjects, at most 1000."),
    test_subjects: Optional[int] = typer.Option(None, min=0, help="Default: 10 % of the subjects, at most 1000."),
    split: Optional[Split] = typer.Option(
        None, help="Put every subject in this split (e.g. a test-only set to evaluate on)."),
    participants: Optional[list[Path]] = typer.Option(
        None, help="aalto-desktop: read only the participants listed in this file "
        "(one id per line, # comments); repeat it to combine lists, e.g. one per public source "
        "(a participant in two lists is an error)."),
    endpoint_url: Optional[str] = _ENDPOINT,
    region: Optional[str] = _REGION,
    progress: bool = typer.Option(True, help="Show a progress bar on stderr."),
    break_lock: bool = typer.Option(
        False, "--break-lock", help="Remove the lock of an earlier job on --out that is no "
        "longer running (another host's, or a killed container's); a job that still runs on "
        "this machine is never unlocked."),
) -> None:
    """Shard a corpus into subject-grouped WebDataset tars plus manifest.json.

    Resumable; re-run on a finished set, it rewrites exactly its missing or corrupt shards.
    One job at a time writes an output: a second one is refused, naming the first.
    """
    from sharding.output import read_rejects
    from sharding.source_spec import parse_source
    from sharding.writer import write_shards

    options = _storage_options(endpoint_url, region)
    manifest = write_shards(parse_source(source, participants or None), out, seed=seed,
                            subjects_per_shard=subjects_per_shard, val_subjects=val_subjects,
                            test_subjects=test_subjects, split=split.value if split else None,
                            workers=workers, progress=progress, storage_options=options,
                            log=lambda message: _console.print(message, highlight=False),
                            break_lock=break_lock)
    counts = {name: sum(s.samples for s in manifest.shards_of(name)) for name in SPLITS}
    shards = {name: len(manifest.shards_of(name)) for name in SPLITS}
    _console.print(f"{out}: {len(manifest.shards)} shards {shards}, subjects {counts}, "
                   f"rejected {manifest.rejected or 'none'}", highlight=False)
    _show_rejects(out, read_rejects(out, **options))


def _show_rejects(out: str, rejects: Optional[dict[str, Any]]) -> None:
    """The first few rejected subjects and where the rest are listed."""
    from sharding.output import MAX_LISTED_REJECTS, REJECTS_NAME, format_reject

    if not rejects or not rejects.get("rejected_subjects"):
        return
    total, listed = rejects["rejected_subjects"], rejects["listed"]
    _console.print(f"{total} subjects rejected, e.g.:", highlight=False)
    for entry in listed[:_SHOWN_REJECTS]:
        _console.print(f"  {format_reject(entry)}", highlight=False, soft_wrap=True)
    scope = "all" if total <= MAX_LISTED_REJECTS else f"the first {MAX_LISTED_REJECTS}"
    _console.print(f"{scope} listed in {out.rstrip('/')}/{REJECTS_NAME}", highlight=False)


shards_app = typer.Typer(help="Inspect a committed shard set.", no_args_is_help=True)


@shards_app.command("verify")
@_clean_errors
def verify(url: str = typer.Argument(..., help="Folder, file:// or s3:// URL of the shard set."),
           endpoint_url: Optional[str] = _ENDPOINT, region: Optional[str] = _REGION) -> None:
    """Decode every shard and check counts and sha256 against the manifest (exit 1 on mismatch)."""
    from sharding.verify import verify_shards

    options = _storage_options(endpoint_url, region)
    report = verify_shards(url, **options)
    for problem in report.problems:
        print_error(problem)
    if not report.ok:
        _print_repair(report.repair, endpoint_url, region)
        raise typer.Exit(1)
    _console.print(f"[green]✓[/] {report.shards} shards, {report.subjects} subjects, "
                   f"{report.sessions} sessions: all verify", highlight=False)


def _print_repair(command: Optional[str], endpoint_url: Optional[str], region: Optional[str]) -> None:
    """Say exactly which command repairs the set (the one that wrote it, re-run)."""
    if command is None:
        typer.echo("this set's source cannot be named by `eerpipe shard`: restore the listed "
                   "shards from a copy", err=True)
        return
    flags = "".join(f" {flag} {shlex.quote(value)}" for flag, value in (
        ("--endpoint-url", endpoint_url), ("--region", region)) if value)
    typer.echo(f"to repair, re-run the command that wrote the set (it rewrites exactly the bad "
               f"shards): {command}{flags}", err=True)


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
