"""The ``eerpipe`` command; each stage registers its own subcommands here."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from common.cli import clean_errors
from jobs.cli import register as _register_jobs
from pipeline.cluster import TrainingFailed
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
_expected = clean_errors(ValueError, FileNotFoundError, StorageError, ShardIntegrityError, TrainingFailed)


_CHECKPOINT = typer.Option(
    ..., "--checkpoint", help="model.pt, a folder holding it, or a run folder (its export/best); local or s3://."
)


@app.callback()
def main() -> None:
    """eerpipe: distributed training with EERLoss."""


@app.command()
@_expected
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="YAML training config (default: built-in defaults)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value overrides, e.g. train.lr=3e-4"),
    resume_from: Optional[str] = typer.Option(None, "--resume-from",
                                              help="Start from this checkpoint (folder or s3:// URL)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines."),
) -> None:
    """Train with Ray Train + DeepSpeed; relaunching the same run.name resumes it. A config with
    train.stages trains its stages in order, as one run (e.g. configs/aalto-desktop.yaml)."""
    from pipeline.cluster import use_local_ray_settings
    from pipeline.config import TrainConfig

    use_local_ray_settings()
    from pipeline.training import train as run_training

    result = run_training(TrainConfig.load(config, overrides or []), resume_from=resume_from, show_progress=not quiet)
    typer.echo(f"run folder:   {result.run_dir}")
    typer.echo(f"checkpoint:   {result.checkpoint}")
    typer.echo(f"final model:  {_written_or_none(result.final_model)}")
    typer.echo(f"best model:   {result.best_model}")


@app.command()
@_expected
def evaluate(
    checkpoint: str = _CHECKPOINT,
    shards: str = typer.Option(..., "--shards", help="The shard set's folder or URL (its manifest.json)."),
    split: str = typer.Option("test", "--split", help="train | val | test."),
    protocol: Optional[str] = typer.Option(
        None, "--protocol",
        help="session (session against session) | kvc (against 5-session enrolment sets, as KVC scores). "
        "Default: the model's validation protocol."
    ),
    impostors: Optional[str] = typer.Option(
        None, "--impostors",
        help="Impostor comparisons per session: a count, or all (every one, what FMR 0.1 % needs). "
        "Default: the model's validation setting."
    ),
    out: str = typer.Option("evaluation", "--out", help="Local folder for metrics.json, report.md and det.png."),
    batch_size: int = typer.Option(1024, "--batch-size", min=1, help="Sessions per forward pass."),
    participants: Optional[Path] = typer.Option(
        None, "--participants",
        help="Score only the split's subjects listed in this file (one id per line), e.g. one source of a benchmark."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Official KVC metrics of an exported model on a split of a shard set."""
    from pipeline.evaluation.commands import evaluate as run_evaluation
    from pipeline.evaluation.protocol import protocol_name
    from pipeline.metrics import report_to_markdown

    report, folder = run_evaluation(
        checkpoint, shards, split=split, protocol=protocol_name(protocol),
        impostors=None if impostors is None else _impostors(impostors), out_dir=out,
        batch_size=batch_size, progress=not quiet, participants=participants,
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
    out: str = typer.Option(..., "--out", help="Local folder for {scenario}_predictions.txt and its .zip."),
    batch_size: int = typer.Option(1024, "--batch-size", min=1, help="Sessions per forward pass."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Score every comparison of a KVC test set and write the submission files (higher = same subject)."""
    from pipeline.evaluation.commands import predict as run_prediction

    text = run_prediction(checkpoint, kvc, scenario, out, batch_size=batch_size, progress=not quiet)
    typer.echo(f"predictions: {text}\nupload:      {text.with_suffix('.zip')}")


experiment = typer.Typer(help="Same budget, one varied setting: losses, batch sizes, operating points.",
                         no_args_is_help=True)
app.add_typer(experiment, name="experiment")
_SHARDS = typer.Option(..., "--shards", help="The shard set's folder or URL (its manifest.json).")
_CONFIG = typer.Option(None, "--config", "-c", help="YAML training config shared by every arm.")
_OUT = typer.Option(Path("experiment"), "--out", help="Folder for results.md/json, det.png and val_eer.png.")
_OVERRIDES = typer.Argument(None, help="section.key=value overrides applied to every arm (an arm's own keys win).")
_PARTICIPANTS = typer.Option(None, "--participants",
                             help="Also score the test subjects listed in this file, named by its stem; repeat it "
                                  "for each source of a combined benchmark.")


def _run_arms(config: Optional[Path], shards: str, out: Path, arms: dict[str, list[str]],
              overrides: Optional[list[str]], arm_configs: Optional[dict[str, str]] = None,
              participants: Optional[list[Path]] = None, test_impostors: Optional[str] = None) -> None:
    from pipeline.cluster import use_local_ray_settings

    use_local_ray_settings()
    from pipeline.experiment import run_experiment

    groups = _participant_groups(participants or [])
    run_experiment(str(config) if config else None, shards, out, arms, overrides=overrides or [],
                   arm_configs=arm_configs, participants=groups,
                   test_impostors=None if test_impostors is None else _impostors(test_impostors, "--test-impostors"))
    typer.echo((out / "results.md").read_text())
    typer.echo(f"written: {out}/results.md, results.json, det.png, val_eer.png")


def _participant_groups(paths: list[Path]) -> dict[str, Path]:
    """``--participants`` lists by name (the file's stem), or a one-line error for two of one name."""
    groups = {path.stem: path for path in paths}
    if len(groups) != len(paths):
        raise ValueError(f"--participants: two lists share a file name ({[str(path) for path in paths]})")
    return groups


def _impostors(text: str, option: str = "--impostors") -> int | Literal["all"]:
    """A count of impostors per session: a positive whole number or ``all``, or a one-line error."""
    if text == "all":
        return "all"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"{option} takes a positive whole number or 'all', got {text!r}")


def _written_or_none(url: str) -> str:
    """A final export's path, or why there is none: a run stopped before its end step (as if
    preempted) exports no final model."""
    from sharding.storage import open_fs

    fs, path = open_fs(url)
    return url if fs.exists(path) else "none (stopped before the end; relaunch to finish)"


def _integers(option: str, text: str) -> list[int]:
    """A comma-separated list of whole numbers, or a one-line error naming the option."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} takes whole numbers separated by commas, got {text!r}") from None


@experiment.command()
@_expected
def ablation(
    shards: str = _SHARDS,
    config: Optional[Path] = _CONFIG,
    out: Path = _OUT,
    arms: str = typer.Option("", "--arms", help="Comma-separated subset of the arms (default: all)."),
    participants: Optional[list[Path]] = _PARTICIPANTS,
    overrides: Optional[list[str]] = _OVERRIDES,
) -> None:
    """Every loss with the same model, batches, optimizer, seed and steps."""
    from pipeline.experiment import chosen_arms

    _run_arms(config, shards, out, chosen_arms([a for a in arms.split(",") if a]), overrides,
              participants=participants)


@experiment.command()
@_expected
def compare(
    shards: str = _SHARDS,
    config: Optional[Path] = _CONFIG,
    out: Path = _OUT,
    arm: list[str] = typer.Option(..., "--arm", help="NAME: OVERRIDES (shell-quoted, space-separated; none: the "
                                                      "config as it is), one arm; repeat it for each."),
    participants: Optional[list[Path]] = _PARTICIPANTS,
    overrides: Optional[list[str]] = _OVERRIDES,
) -> None:
    """Named arms, each the config with its own overrides: a screen of a recipe's choices (model,
    sequence length, a stage's rate or length: train.stages[NAME].train.lr=…), read on the
    validation EER; an arm X beside an arm X-control gets its lead in the summary."""
    from pipeline.experiment import named_arms

    _run_arms(config, shards, out, named_arms(arm), overrides, participants=participants)


@experiment.command("batch-size")
@_expected
def batch_size(
    shards: str = _SHARDS,
    config: Optional[Path] = _CONFIG,
    out: Path = _OUT,
    subjects: str = typer.Option("4,8,16,32", "--subjects", help="Subjects per rank per batch (P), comma-separated."),
    participants: Optional[list[Path]] = _PARTICIPANTS,
    overrides: Optional[list[str]] = _OVERRIDES,
) -> None:
    """EER against the number of subjects per global batch (P × ranks, gathered)."""
    arms = {f"P{p}": [f"data.subjects_per_batch={p}"] for p in _integers("--subjects", subjects)}
    _run_arms(config, shards, out, arms, overrides, participants=participants)


@experiment.command()
@_expected
def subjects(
    shards: str = _SHARDS,
    config: Optional[Path] = _CONFIG,
    out: Path = _OUT,
    sizes: str = typer.Option("1000,2000,4000,0", "--sizes",
                              help="Training subjects, comma-separated; 0: the whole training split."),
    control: Optional[Path] = typer.Option(None, "--control",
                                           help="A baseline's config, trained at every size too (subjects-N-control)."),
    participants: Optional[list[Path]] = _PARTICIPANTS,
    overrides: Optional[list[str]] = _OVERRIDES,
) -> None:
    """The same recipe on nested subsets of the training subjects, at the same steps (give the
    config's stages train.steps: epochs would grow with the subjects); validated and tested on the
    same held-out subjects. `eerpipe experiment summary` gives the recipe's lead against subjects."""
    from pipeline.experiment import subjects_arms

    arms, arm_configs = subjects_arms(_integers("--sizes", sizes), str(control) if control else None)
    _run_arms(config, shards, out, arms, overrides, arm_configs, participants)


@experiment.command()
@_expected
def summary(
    folders: list[Path] = typer.Argument(..., help="Output folders of one experiment, e.g. one per run.seed."),
    out: Path = typer.Option(Path("summary"), "--out", help="Folder for summary.md/json and lead.png."),
    predict_at: Optional[int] = typer.Option(None, "--predict-at", min=1,
                                             help="Extrapolate the lead's trend to this many training subjects."),
) -> None:
    """Each arm's mean ± sd over the folders, and an arm's lead over its -control arm (against the
    training subjects, when they differ)."""
    from pipeline.experiment_summary import summarize

    summarize(folders, out, predict_at)
    typer.echo((out / "summary.md").read_text())


@experiment.command()
@_expected
def memory(
    shards: str = _SHARDS,
    config: Optional[Path] = _CONFIG,
    out: Path = _OUT,
    sizes: str = typer.Option("0,1024,4096,16384", "--sizes", help="Memory rows, comma-separated; 0: none."),
    losses: str = typer.Option("eer-area,multisimilarity", "--losses", help="Ablation arms that get each memory."),
    encoders: str = typer.Option("momentum,current", "--encoders",
                                 help="Who embeds the queue: momentum (an EMA of the model), current (the model)."),
    participants: Optional[list[Path]] = _PARTICIPANTS,
    overrides: Optional[list[str]] = _OVERRIDES,
) -> None:
    """Each loss with each cross-batch memory size and encoder, at the same budget."""
    from pipeline.experiment import memory_arms

    arms = memory_arms([a for a in losses.split(",") if a], _integers("--sizes", sizes),
                       [e for e in encoders.split(",") if e])
    _run_arms(config, shards, out, arms, overrides, participants=participants)


@experiment.command("operating-point")
@_expected
def operating_point(
    shards: str = _SHARDS,
    config: Optional[Path] = _CONFIG,
    out: Path = _OUT,
    fmr: float = typer.Option(1e-3, "--fmr", help="The FMR the second arm trains for."),
    threshold_momentum: Optional[float] = typer.Option(
        None, "--threshold-momentum",
        help="Add an arm, target-fmr-<t>-persistent: the FMR target at a persistent threshold of this momentum.",
    ),
    band: Optional[float] = typer.Option(
        None, "--band",
        help="Add an arm, target-fmr-band-<t>-<b>: the FNMR averaged over FMRs from --fmr up to this one.",
    ),
    test_impostors: Optional[str] = typer.Option(
        None, "--test-impostors",
        help="Impostors per session on the test split: a count, or all (every pair). Default: as validated.",
    ),
    participants: Optional[list[Path]] = _PARTICIPANTS,
    overrides: Optional[list[str]] = _OVERRIDES,
) -> None:
    """EERLoss at the EER point vs at a fixed FMR (and at a persistent threshold, or an FMR band):
    FNMR there and EER for each.

    Validation and test score every impostor pair (``eval.impostors_per_session=all``, unless an
    override says otherwise): at FMR 0.1 % a sample of ten per session leaves a few dozen
    comparisons past the threshold, too few to pick a checkpoint or to compare two models. A test
    split too large for that (its report would not fit in memory) is refused before any arm
    trains: give a count, e.g. eval.impostors_per_session=1000. To validate on a sample and test on
    every pair: eval.impostors_per_session=1000 --test-impostors all (an experiment that already
    trained, re-run so, only scores its arms)."""
    from pipeline.experiment import operating_point_arms

    arms = operating_point_arms(fmr, threshold_momentum, band)
    _run_arms(config, shards, out, arms, ["eval.impostors_per_session=all", *(overrides or [])],
              participants=participants, test_impostors=test_impostors)


if __name__ == "__main__":
    app()
