"""The ``eerpipe`` command; each stage registers its own subcommands here."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jobs.cli import register as _register_jobs
from sharding.cli import clean_errors
from sharding.cli import register as _register_sharding
from sharding.format import ShardIntegrityError
from sharding.storage import StorageError

app = typer.Typer(
    name="eerpipe",
    help="Shard keystroke corpora, train verification models with EERLoss, evaluate and submit jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_register_sharding(app)
_register_jobs(app)
_expected = clean_errors(ValueError, FileNotFoundError, StorageError, ShardIntegrityError)


_CHECKPOINT = typer.Option(
    ..., "--checkpoint", help="model.pt, a folder holding it, or a run folder (its export/best); local or s3://."
)


@app.callback()
def main() -> None:
    """eerpipe: distributed training with EERLoss."""


@app.command()
@_expected
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML training config (default: built-in defaults)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value overrides, e.g. train.lr=3e-4"),
    resume_from: Optional[str] = typer.Option(None, "--resume-from", help="Start from this checkpoint (folder or s3:// URL)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines."),
) -> None:
    """Train with Ray Train + DeepSpeed; relaunching the same run.name resumes it."""
    from pipeline.config import TrainConfig, use_local_ray_settings

    use_local_ray_settings()
    from pipeline.train import train as run_training

    result = run_training(TrainConfig.load(config, overrides or []), resume_from=resume_from, show_progress=not quiet)
    typer.echo(f"run folder:   {result.run_dir}")
    typer.echo(f"checkpoint:   {result.checkpoint}")
    typer.echo(f"final model:  {result.final_model}")
    typer.echo(f"best model:   {result.best_model}")


@app.command()
@_expected
def evaluate(
    checkpoint: str = _CHECKPOINT,
    shards: str = typer.Option(..., "--shards", help="The shard set's folder or URL (its manifest.json)."),
    split: str = typer.Option("test", "--split", help="train | val | test."),
    out: Path = typer.Option(Path("evaluation"), "--out", help="Folder for metrics.json, report.md and det.png."),
    batch_size: int = typer.Option(1024, "--batch-size", min=1, help="Sessions per forward pass."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Official KVC metrics of an exported model on a split of a shard set."""
    from pipeline.evaluate import evaluate as run_evaluation
    from pipeline.metrics import report_to_markdown

    report, folder = run_evaluation(
        checkpoint, shards, split=split, out_dir=out, batch_size=batch_size, progress=not quiet
    )
    typer.echo(report_to_markdown(report))
    typer.echo(f"\nwritten: {folder}/metrics.json, {folder}/report.md, {folder}/det.png")


@app.command()
@_expected
def predict(
    checkpoint: str = _CHECKPOINT,
    kvc: Path = typer.Option(
        ..., "--kvc", help="KVC data folder (or its scenario subfolder) with the test sessions and comparisons."
    ),
    scenario: str = typer.Option(..., "--scenario", help="desktop | mobile."),
    out: Path = typer.Option(..., "--out", help="Folder for {scenario}_predictions.txt and its .zip."),
    batch_size: int = typer.Option(1024, "--batch-size", min=1, help="Sessions per forward pass."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Score every comparison of a KVC test set and write the submission files (higher = same subject)."""
    from pipeline.evaluate import predict as run_prediction

    text = run_prediction(checkpoint, kvc, scenario, out, batch_size=batch_size, progress=not quiet)
    typer.echo(f"predictions: {text}\nupload:      {text.with_suffix('.zip')}")


if __name__ == "__main__":
    app()
