"""How long a run trains and at what learning rate: one definition for the driver, the workers
and the experiments.

Steps per epoch follow the sampler's own rule (:class:`pipeline.data.stream.Plan`) from the
manifest alone, so the driver knows the schedule — and refuses one that cannot be filled —
before Ray starts, and never builds a loader just to count batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import TrainConfig
from sharding.format import Manifest, ShardInfo


@dataclass(frozen=True)
class Schedule:
    """Step counts of a run (every rank takes the same steps)."""

    steps_per_epoch: int
    total_steps: int  # train.steps, or epochs × steps_per_epoch: the span of the learning-rate schedule
    stop_step: int  # where the run stops: the end, or earlier for max_steps / stop_after_epochs


def schedule_of(config: TrainConfig, manifest: Manifest) -> Schedule:
    """The schedule of ``config`` on the shard set of ``manifest``; refuses a batch shape the
    training split cannot fill, naming the settings."""
    from pipeline.data.stream import Plan

    data, train = config.data, config.train
    try:
        plan = Plan.make(
            training_shards(config, manifest), train.num_workers, data.loader_workers, data.subjects_per_batch,
            config.run.seed
        )
    except ValueError as error:
        raise ValueError(
            f"{data.shards}: data.subjects_per_batch={data.subjects_per_batch}, train.num_workers="
            f"{train.num_workers}, data.loader_workers={data.loader_workers}: {error}"
        ) from None
    steps = plan.batches_per_epoch
    total = train.steps or steps * train.epochs
    stop = total
    if train.max_steps > 0:
        stop = min(stop, train.max_steps)
    if train.stop_after_epochs > 0:
        stop = min(stop, train.stop_after_epochs * steps)
    return Schedule(steps, total, stop)


def training_shards(config: TrainConfig, manifest: Manifest) -> list[ShardInfo]:
    """The shards a run trains on: the training split, or its first shards holding
    ``data.train_subjects`` subjects."""
    from pipeline.data.shards import first_subjects

    return first_subjects(manifest.shards_of("train"), config.data.train_subjects)


def end_step(config: TrainConfig, schedule: Schedule) -> int:
    """The step where the run's training ends and its final model is exported: the schedule's
    end or ``train.max_steps``, never ``train.stop_after_epochs``, which stops it as if preempted."""
    return min(schedule.total_steps, config.train.max_steps or schedule.total_steps)


def scheduled_end(config: TrainConfig) -> int:
    """:func:`end_step` of ``config`` on its shard set (the manifest is read)."""
    from sharding.format import load_manifest

    return end_step(config, schedule_of(config, load_manifest(config.data.shards)))


def sessions_per_step(config: TrainConfig) -> int:
    """Sessions in a global batch: P subjects × K sessions on every rank."""
    return config.data.subjects_per_batch * config.data.sessions_per_subject * config.train.num_workers


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up, then cosine decay to zero over the schedule (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
