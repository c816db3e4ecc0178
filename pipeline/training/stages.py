"""Staged training (``train.stages``): one run trained in stages, each with its own loss, batch,
rate and length, e.g. a MultiSimilarity model refined by EERLoss at a large batch.

Each stage is a run of its own, ``{storage}/{name}/stages/{index}-{stage name}``, so everything a
run has — checks before launch, checkpoints, an exact resume from Ray's snapshot, exports — a
stage has too, and the optimizer and schedule restart with it. A stage after the first starts
from the previous stage's final export (``train.init_from``). A stage is finished when its final
export exists (written atomically, at the end of its schedule only), so a relaunch skips the
finished stages and Ray resumes the unfinished one from its own checkpoints: a kill inside a
stage or between two leaves the same end as a straight run. The staged run's
``export/{best,final}`` are its last stage's, so its best model is chosen by the last stage's
validation target. Every stage logs into the staged run's one W&B run, at steps that continue
across stages, beside a ``stage`` metric.
"""

from __future__ import annotations

from pipeline.config import TrainConfig
from pipeline.training.driver import (
    TrainResult,
    check_run_storage,
    launch,
    prepare,
    recorded_result,
    run_lock,
    trained_to_the_end,
)
from pipeline.training.state import StageContext

STAGES_FOLDER = "stages"


def train_stages(config: TrainConfig, resume_from: str | None, show_progress: bool) -> TrainResult:
    """Run (or resume) the staged run ``config`` stage by stage, every stage checked before the
    first starts and the staged run's folder held across them (one lock for the whole run: each
    stage is a run of its own, in that folder); returns the staged run's result (a stage stopped
    early ends it there, as a preempted run: the next launch goes on from it)."""
    if resume_from:
        raise ValueError("--resume-from does not apply to a staged run (train.stages): relaunch it, and each stage "
                         "goes on from its own checkpoints")
    config = config.with_absolute_paths()
    stages = [stage_config(config, index) for index in range(len(config.train.stages))]
    check_run_storage(config)
    results = []
    with run_lock(config.run_dir):
        offsets = _checked_step_offsets(config, stages)
        for index, (stage, offset) in enumerate(zip(stages, offsets)):
            if trained_to_the_end(stage):
                results.append(_finished_result(config, index, stage))
                continue
            context = StageContext(index, offset, config.run.name, config.run.storage, config.to_dict())
            results.append(launch(*prepare(stage), show_progress=show_progress, stage=context))
            if not trained_to_the_end(stage):  # stopped as if preempted (train.stop_after_epochs)
                break
        else:
            _publish_exports(stages[-1].run_dir, config.run_dir)
    return _staged_result(config.run_dir, results, offsets)


def stage_config(config: TrainConfig, index: int) -> TrainConfig:
    """Stage ``index`` of the staged run ``config`` (absolute paths) as a run of its own in the
    staged run's folder, logging into its W&B folder, and, after the first stage, starting from
    the previous stage's final export."""
    from pipeline.exports import export_path

    stage = config.stage(index).with_absolute_paths()
    stage.run.storage = f"{config.run_dir}/{STAGES_FOLDER}"
    stage.run.name = _stage_name(config, index)
    stage.wandb.dir = config.wandb.dir or config.run_dir
    if index:
        stage.train.init_from = export_path(f"{stage.run.storage}/{_stage_name(config, index - 1)}", "final")
    return stage


def _stage_name(config: TrainConfig, index: int) -> str:
    return f"{index}-{config.train.stages[index]['name']}"


def _checked_step_offsets(config: TrainConfig, stages: list[TrainConfig]) -> list[int]:
    """The driver's checks of every stage, before any starts, a refusal naming the stage; returns
    each stage's first step in the staged run. A later stage's warm start is checked without its
    file, which the stage before writes: every stage trains the same model on the same features."""
    from pipeline.training.schedule import scheduled_end
    from sharding.storage import StorageError

    offsets, steps = [], 0
    for index, stage in enumerate(stages):
        offsets.append(steps)
        checked = TrainConfig.from_dict(stage.to_dict())
        if index:
            checked.train.init_from = ""
        try:
            prepare(checked)
        except (ValueError, FileNotFoundError, StorageError) as error:  # each a one-line refusal
            raise type(error)(f"train.stages[{index}] ({config.train.stages[index]['name']}): {error}") from None
        steps += scheduled_end(stage)
    return offsets


def _finished_result(config: TrainConfig, index: int, stage: TrainConfig) -> TrainResult:
    """A finished stage's result, without launching it again; refused, naming the stage, when
    the stage's settings now end at another step (its model would be kept as trained, and the
    later stages would log at shifted steps)."""
    from pipeline.training.schedule import scheduled_end

    result = recorded_result(stage)
    wanted = scheduled_end(stage)
    if result.metrics["step"] != wanted:
        raise ValueError(
            f"train.stages[{index}] ({config.train.stages[index]['name']}): finished at step "
            f"{result.metrics['step']}, but its settings now end at step {wanted}; delete {stage.run_dir} and the "
            "stages after it to train them again"
        )
    return result


def _publish_exports(last_stage_dir: str, run_dir: str) -> None:
    """The last stage's exports become the staged run's, each file whole; ``final`` last, so
    that it marks a finished run as it marks a finished stage."""
    from common.atomic import write_atomic
    from pipeline.exports import export_path
    from sharding.storage import open_fs

    for which in ("best", "final"):
        source_fs, source = open_fs(export_path(last_stage_dir, which))
        if source_fs.isfile(source):  # a stage that never validated has no best export
            target_fs, target = open_fs(export_path(run_dir, which))
            write_atomic(target_fs, target, source_fs.cat_file(source))


def _staged_result(run_dir: str, results: list[TrainResult], offsets: list[int]) -> TrainResult:
    """The staged run's result: its last stage's metrics at the staged run's steps, the stages'
    validation curves end to end, training time and sessions summed over the stages."""
    from pipeline.exports import export_path
    last, offset = results[-1], offsets[len(results) - 1]
    metrics = last.metrics | {
        "step": offset + last.metrics["step"], "total_steps": offset + last.metrics["total_steps"],
        "time/train_s": sum(result.metrics["time/train_s"] for result in results), "stage": len(results) - 1,
    }
    curve = [(start + step, value) for result, start in zip(results, offsets) for step, value in result.curve]
    return TrainResult(run_dir=run_dir, checkpoint=last.checkpoint, metrics=metrics,
                       final_model=export_path(run_dir, "final"), best_model=export_path(run_dir, "best"),
                       curve=curve, sessions=sum(result.sessions for result in results))
