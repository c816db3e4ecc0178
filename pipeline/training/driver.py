"""The driver of a run: everything checkable is checked here, in seconds, before Ray starts;
then a ``TorchTrainer`` runs :func:`~pipeline.training.worker.worker_loop` on every rank.

Relaunching the same ``run.name`` resumes from the latest checkpoint in Ray's snapshot of the
run (:mod:`~pipeline.training.ray_snapshot`); deleting a bad checkpoint goes on from the previous one.
One launch at a time trains a run: it holds the run's folder while it trains (:func:`run_lock`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import TrainConfig, absolute
from pipeline.exports import export_path
from pipeline.training.checkpointer import check_checkpoint
from pipeline.training.ray_snapshot import Resumption, resumption
from pipeline.training.schedule import schedule_of, sessions_per_step, training_shards
from pipeline.training.state import StageContext


@dataclass
class TrainResult:
    """What a finished (or deliberately stopped) run left behind."""

    run_dir: str
    checkpoint: str | None
    metrics: dict[str, Any]
    final_model: str
    best_model: str
    curve: list[tuple[int, float]]  # (step, val EER) of every kept checkpoint
    sessions: int  # training sessions seen: steps × P × K × ranks, summed over a staged run's stages


@contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold ``{run_dir}/_lock.json`` while the block trains the run: a second launch of the run
    name, which would mix its checkpoints, W&B run and exports with this one's, is refused in one
    line naming the holder, before Ray starts. The lock is leased
    (:func:`~sharding.lock.lock_lease`): a run preempted with its pod is taken over by its
    resubmission once the lease runs out, while a live run on another node is still refused."""
    from sharding.lock import lock_lease, output_lock
    from sharding.storage import open_fs

    fs, path = open_fs(run_dir)
    with output_lock(fs, path, run_dir, job="training run", lease=lock_lease(), log=warnings.warn):
        yield


def train_run(config: TrainConfig, resume_from: str | None = None, show_progress: bool = True) -> TrainResult:
    """Run (or resume) the run ``config`` to the end of its schedule. Its folder is locked before
    its checks, which read it (and may repair Ray's snapshot there): a second launch of a running
    run is refused before it touches the run's files. A run that has trained to the end its
    settings give is not launched again: its result is read from its files."""
    from pipeline.training.schedule import scheduled_end

    config = config.with_absolute_paths()
    check_run_storage(config)
    with run_lock(config.run_dir):
        config, resume_from = prepare(config, resume_from)
        if not resume_from and trained_to_the_end(config):
            result = recorded_result(config)
            if result.metrics["step"] == scheduled_end(config):  # else settings that now end elsewhere go on
                return result
        return launch(config, resume_from, show_progress)


def launch(config: TrainConfig, resume_from: str | None = None, show_progress: bool = True,
           stage: StageContext | None = None) -> TrainResult:
    """One Ray Train run of ``config`` checked by :func:`prepare`: a run, or the ``stage`` of a
    staged run."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import init_ray, ray_storage
    from pipeline.training.progress import progress_display
    from pipeline.training.worker import worker_loop

    storage_path, storage_filesystem = ray_storage(config.run.storage)
    init_ray(config.train.use_gpu)
    with progress_display(show_progress) as forward_reports:
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"config": config.to_dict(), "resume_from": resume_from,
                               "stage": stage and asdict(stage)},
            scaling_config=ScalingConfig(num_workers=config.train.num_workers, use_gpu=config.train.use_gpu),
            run_config=RunConfig(
                name=config.run.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                checkpoint_config=CheckpointConfig(num_to_keep=config.train.num_to_keep),
                failure_config=FailureConfig(max_failures=config.train.max_failures),
                # Ray Train v2 takes its UserCallback here; the annotation names Tune's Callback
                callbacks=[forward_reports],  # type: ignore[list-item]
            ),
        )
        return run_result(config, _fit(trainer, config.run_dir))


def run_result(config: TrainConfig, result: Any) -> TrainResult:
    """The :class:`TrainResult` of Ray's ``result`` of the run ``config``."""
    from pipeline.cluster import checkpoint_url

    metrics = dict(result.metrics or {})
    return TrainResult(
        run_dir=config.run_dir,
        checkpoint=result.checkpoint and checkpoint_url(result.checkpoint.path, config.run.storage),
        metrics=metrics,
        final_model=export_path(config.run_dir, "final"),
        best_model=export_path(config.run_dir, "best"),
        curve=sorted((m["step"], m["val/eer"]) for _, m in result.best_checkpoints if "val/eer" in m),
        sessions=metrics.get("step", 0) * sessions_per_step(config),
    )


def trained_to_the_end(config: TrainConfig) -> bool:
    """Whether the run (or stage) has trained to its end: its final export is written there,
    atomically, after its last checkpoint."""
    from sharding.storage import open_fs

    fs, path = open_fs(export_path(config.run_dir, "final"))
    fs.invalidate_cache()  # a listing cached before the run trained
    return fs.isfile(path)


def recorded_result(config: TrainConfig) -> TrainResult:
    """A finished run's result, read from Ray's record of its checkpoints instead of launching it."""
    from ray.train import Result

    from pipeline.cluster import ray_storage

    path, filesystem = ray_storage(config.run_dir)
    return run_result(config, Result.from_path(path, storage_filesystem=filesystem))


def _fit(trainer: Any, run_dir: str) -> Any:
    """``trainer.fit()``, its failure reduced to one line (a full disk on a worker reads as
    ``OSError: [Errno 28] No space left on device`` naming the run)."""
    from ray.train import TrainingFailedError

    from pipeline.cluster import TrainingFailed
    from pipeline.exports import first_line

    try:
        return trainer.fit()
    except TrainingFailedError as error:
        where, cause = _first_cause(error)
        raise TrainingFailed(
            f"{run_dir}: training failed on {where}: {first_line(cause)}; relaunch the same run.name to go on "
            "from its last checkpoint"
        ) from None


PEER_FAILURE_WORDS = ("gloo", "nccl", "collective", "connection reset", "connection closed", "broken pipe")


def _first_cause(error: Exception) -> tuple[str, BaseException]:
    """Where the run failed and why: the lowest rank whose own error is not a collective's (when
    one rank dies, the others fail in gloo or NCCL waiting for it), or the controller."""
    failures: dict[int, BaseException] = getattr(error, "worker_failures", None) or {}
    if not failures:
        return "the controller", getattr(error, "controller_failure", error)

    def follows_a_peer(rank: int) -> bool:
        text = f"{type(failures[rank]).__name__} {failures[rank]}".lower()
        return any(word in text for word in PEER_FAILURE_WORDS)

    rank = min(failures, key=lambda rank: (follows_a_peer(rank), rank))
    return f"rank {rank}", failures[rank]


def prepare(config: TrainConfig, resume_from: str | None = None) -> tuple[TrainConfig, str | None]:
    """The config with absolute paths and the checked ``resume_from``, or one clear error: bad
    shards, a batch the split cannot fill, an unknown model or loss, a memory the loss cannot
    use, a foreign warm start, an unwritable storage, a missing or unsafe checkpoint, W&B online
    without a login. Ray's snapshot of the run is repaired here when a checkpoint it names was
    deleted, so that the run goes on from the previous one."""
    from pipeline.training.wandb_run import check_wandb
    from sharding.format import load_manifest

    config = config.with_absolute_paths()
    wandb_notice = check_wandb(config)  # refuses wandb.mode=online without a login
    if wandb_notice:
        warnings.warn(wandb_notice, stacklevel=3)  # once, on the driver
    manifest = load_manifest(config.data.shards)  # fails fast: no shards, unreachable storage
    if not manifest.shards_of("train") or not manifest.shards_of("val"):
        raise ValueError(f"{config.data.shards}: training needs train and val shards")
    subjects = sum(shard.samples for shard in training_shards(config, manifest))
    _check_batch(config, subjects)
    schedule_of(config, manifest)  # refuses fewer shards than readers, or a batch a reader cannot fill
    _check_model_and_loss(config, subjects)
    _warn_sparse_selection(config, sum(shard.sessions for shard in manifest.shards_of("val")))
    check_run_storage(config)
    start = None
    if resume_from:
        resume_from = absolute(resume_from)
        start = resume_from, check_checkpoint(resume_from)
    resumed = resumption(config.run_dir)  # repairs a snapshot naming deleted checkpoints
    if resumed:  # Ray resumes the run from it (not from resume_from): refuse it now, not in every worker
        start = resumed.checkpoint, _check_resumed(resumed, config.run_dir)
    if start:
        _check_resumable(config, *start)
    return config, resume_from


def check_run_storage(config: TrainConfig) -> None:
    """``run.storage`` is writable and the run's folder is a folder (or not there yet): checked
    before the run's lock is taken, so that a bad storage reads as itself, not as a lock error."""
    from sharding.storage import check_writable

    check_writable(config.run.storage)
    _check_run_folder(config.run_dir)


def _check_run_folder(run_dir: str) -> None:
    """The run's folder is a folder (or not there yet): Ray would fail on a file only after its start."""
    from sharding.storage import open_fs

    fs, path = open_fs(run_dir)
    if fs.isfile(path):
        raise ValueError(f"{run_dir}: the run's folder (run.storage/run.name) is a file")


def _check_resumed(resumed: Resumption, run_dir: str) -> dict[str, Any]:
    """:func:`check_checkpoint` of the checkpoint Ray resumes the run from. A refusal names the
    documented way out, which loses only that checkpoint: delete it, and the next launch
    repairs Ray's snapshot and goes on from the previous one."""
    try:
        return check_checkpoint(resumed.checkpoint)
    except (ValueError, FileNotFoundError) as error:
        way_out = (f"delete {resumed.checkpoint} to go on from the previous checkpoint ({resumed.previous})"
                   if resumed.previous
                   else f"it is the run's only checkpoint: delete {run_dir} to train it from scratch")
        raise ValueError(f"{error}; {way_out}") from None


def _check_batch(config: TrainConfig, subjects: int) -> None:
    """Each rank needs P subjects of its own per batch."""
    needed = config.data.subjects_per_batch * config.train.num_workers
    if needed > subjects:
        raise ValueError(
            f"data.subjects_per_batch={config.data.subjects_per_batch} on train.num_workers="
            f"{config.train.num_workers} ranks needs {needed} training subjects; {config.data.shards} has {subjects}"
        )


def _warn_sparse_selection(config: TrainConfig, val_sessions: int) -> None:
    """A run for a low FMR validated on a few impostor draws trains fine but keeps a noise-picked
    best export: say so before the launch, once."""
    from pipeline.training.validator import sparse_selection

    reason = sparse_selection(config, val_sessions)
    if reason:
        warnings.warn(reason, stacklevel=3)


MAX_PARAMETERS = 1_000_000_000  # far above any keystroke model; options past it (hidden=10**7) would fill memory


def _check_model_and_loss(config: TrainConfig, subjects: int) -> None:
    """Build the model (without memory, to count its weights first) and the loss once, as the
    workers will: a bad name, option or size fails here, in one line naming its setting."""
    import torch

    from pipeline.losses.registry import MEMORY_LOSSES
    from pipeline.training.components import build_criterion, build_run_model
    from pipeline.training.warm_start import warm_start_weights

    model, loss = config.model, config.loss
    with torch.device("meta"):
        built = _built(f"model {model.name!r} with model.options={model.options}", lambda: build_run_model(config))
    weights = sum(parameter.numel() for parameter in built.parameters())
    if weights > MAX_PARAMETERS:
        raise ValueError(f"model {model.name!r} with model.options={model.options} has {weights:,} weights, "
                         f"more than {MAX_PARAMETERS:,}")
    criterion = _built(f"loss {loss.name!r} with loss.options={loss.options}",
                       lambda: build_criterion(config, num_classes=subjects))
    if config.loss.memory.size and not criterion.takes_memory:
        raise ValueError(
            f"loss.memory.size={config.loss.memory.size} needs a loss that scores pairs against a memory "
            f"({', '.join(MEMORY_LOSSES)}, or a sum of them); loss.name={config.loss.name!r} cannot"
        )
    if config.train.init_from:
        warm_start_weights(config)


def _built(what: str, build: Callable[[], Any]) -> Any:
    """``build()``, or one line naming ``what`` when its options do not build (a constructor's
    ``TypeError`` for an unknown option, ``RuntimeError`` for a negative size)."""
    from pipeline.exports import first_line

    try:
        return build()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{what}: {first_line(error)}") from None


def _check_resumable(config: TrainConfig, where: str, saved: dict[str, Any]) -> None:
    """A checkpoint continues only what it was saved with; each part of it says what that means
    for it: the stream (the loader's fingerprint: batch shape, ranks, workers, manifest…), the
    model's settings, the memory and the persistent threshold (the opt-in parts)."""
    from pipeline.losses.registry import threshold_resume_problem
    from pipeline.training.memory import memory_resume_problem

    problems = (_stream_resume_problem(config, saved), _model_resume_problem(config, saved),
                memory_resume_problem(config, saved), threshold_resume_problem(saved, config.loss.threshold_momentum))
    problem = next((problem for problem in problems if problem), None)
    if problem:
        raise ValueError(f"{where}: {problem}")


def _stream_resume_problem(config: TrainConfig, saved: dict[str, Any]) -> str | None:
    from pipeline.training.components import train_loader

    if "loader" not in saved:
        return None
    try:
        train_loader(config, rank=0, world=config.train.num_workers).load_state_dict(saved["loader"])
    except ValueError as error:
        return str(error)
    return None


def _model_resume_problem(config: TrainConfig, saved: dict[str, Any]) -> str | None:
    model = saved.get("config", {}).get("model")
    if model is not None and model != asdict(config.model):
        return f"saved for model {model}, this run trains {asdict(config.model)}"
    return None
