"""The training function every Ray Train worker (one DeepSpeed rank) runs.

Each step: this rank's P × K batch, copied to the engine's device → embeddings all-gathered with
gradients → the loss on the global batch, and on its pairs with a cross-batch memory if the run
has one (:class:`~pipeline.training.model_with_loss.ModelWithLoss`); DeepSpeed averages the gradients, which
makes them those of one process holding the global batch. Validation, checkpoints and reports
happen at the steps the config names; a checkpoint's report is a barrier on all ranks.
"""

from __future__ import annotations

from typing import Any

import ray.train
import torch

from pipeline.config import TrainConfig
from pipeline.exports import export_path, save_model
from pipeline.training.checkpointer import Checkpointer
from pipeline.training.clock import StepTimer
from pipeline.training.components import build_criterion, build_run_model, train_loader
from pipeline.training.engine import build_engine, pins_memory
from pipeline.training.hard_batches import HardBatches
from pipeline.training.memory import CrossBatchMemory, memory_of
from pipeline.training.metrics_sink import MetricsSink, parameter_grad_norm, step_metrics
from pipeline.training.schedule import end_step, schedule_of, sessions_per_step
from pipeline.training.state import RunState, StageContext
from pipeline.training.validator import Validator


def worker_loop(payload: dict[str, Any]) -> None:
    """Train ``payload["config"]`` from its latest checkpoint (or ``resume_from``) to its stop step;
    ``payload["stage"]``: the staged run it is a stage of, if any."""
    config = TrainConfig.from_dict(payload["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.run.seed)  # identical initial weights on every rank
    loader = train_loader(config, rank, world, pin_memory=pins_memory(config))
    schedule = schedule_of(config, loader.shard_set.manifest)
    model, criterion = _model_and_loss(config, loader.num_classes)
    memory = memory_of(config, model)
    engine = build_engine(config, world, schedule, model, criterion, memory)
    state = RunState()
    checkpointer = Checkpointer(engine, _checkpoint_parts(state, loader, memory, criterion), config, rank)
    checkpointer.restore(payload.get("resume_from"))
    stage = StageContext(**payload["stage"]) if payload.get("stage") else None
    validate, sink = Validator(config, rank, world), MetricsSink(config, rank, stage)
    device = torch.device(engine.device)
    timer = StepTimer(device)
    hard = HardBatches(config, loader, engine.module.model)
    sessions = sessions_per_step(config)
    seconds_before, launched = state.train_seconds, timer.last  # time of earlier launches of this run

    def logs(step: int) -> bool:
        return step % config.train.log_every == 0 or step == schedule.stop_step

    timer.measuring = logs(state.step + 1)
    while state.step < schedule.stop_step:
        hard.refresh()  # an epoch's start: the neighbour table, when due
        timer.lap("centroids")
        for batch in loader:
            batch = batch.to(device, non_blocking=True)  # DeepSpeed's forward does not move inputs
            timer.lap("data")
            state.step += 1
            log_now = logs(state.step)
            loss, stats = engine(batch.features, batch.mask, batch.labels, return_stats=log_now, step=state.step,
                                 wait_for=timer.wait_for)
            timer.lap("model")
            engine.backward(loss)
            norm = parameter_grad_norm(engine) if log_now else None
            timer.lap("backward")
            engine.step()
            engine.module.follow_weights(timer.wait_for)
            timer.lap("optimizer")
            epoch_end = loader.step >= loader.batches_per_epoch
            state.train_seconds = seconds_before + timer.last - launched
            metrics: dict[str, Any] = {"step": state.step, "epoch": loader.epoch, "total_steps": schedule.stop_step,
                                       "time/train_s": state.train_seconds}
            if log_now:
                metrics.update(step_metrics(engine, loss, stats, norm, timer, sessions))
                metrics.update(hard.metrics(batch))
            validate_now = epoch_end or _every(state.step, config.train.val_every)
            if validate_now:
                metrics.update(validate(engine.module.model, state))
            if log_now or validate_now:
                sink.log(metrics, state.step, validate.det if validate_now else None)
            if epoch_end or state.step == schedule.stop_step or _every(state.step, config.train.checkpoint_every):
                with checkpointer.written(f"step{state.step:08d}") as checkpoint:
                    sink.publish(metrics, checkpoint)
            elif log_now or validate_now:
                sink.publish(metrics)
            timer.measuring = logs(state.step + 1)  # from the lap that starts the next step
            timer.lap("reporting")
            if state.step >= schedule.stop_step:
                break
    if rank == 0 and state.step >= end_step(config, schedule):  # not when stopped as if preempted
        save_model(export_path(config.run_dir, "final"), engine.module.model, config.to_dict())
    sink.finish()


def _checkpoint_parts(
    state: RunState, loader: Any, memory: CrossBatchMemory | None, criterion: torch.nn.Module
) -> dict[str, Any]:
    """The run's parts a checkpoint saves; the memory and the loss's persistent threshold only
    when the run has them, so that runs without keep their checkpoints' layout (and older
    checkpoints stay loadable)."""
    from pipeline.losses.registry import running_threshold_of

    parts: dict[str, Any] = {"run": state, "loader": loader}
    if memory is not None:
        parts["memory"] = memory
    threshold = running_threshold_of(criterion)
    if threshold is not None:
        parts["threshold"] = threshold
    return parts


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _model_and_loss(config: TrainConfig, num_classes: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model (warm-started from ``train.init_from`` if set; a checkpoint of this run still
    wins in ``restore``) and the loss; the driver built both once already, so these succeed."""
    from pipeline.training.warm_start import warm_start_weights

    model = build_run_model(config)
    if config.train.init_from:
        model.load_state_dict(warm_start_weights(config))
    return model, build_criterion(config, num_classes)
