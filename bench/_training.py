"""What the training benchmarks share: a local Ray cluster, synthetic shards, short runs of
``configs/cpu-local.yaml`` and the step split of a run's last step (from its ``time/*`` metrics).

A run logs only its last step (``train.log_every`` = its step count), so no other step pays
for a report, and that step's metrics are what ``train`` returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.cluster import use_local_ray_settings
from pipeline.config import TrainConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cpu-local.yaml"
PHASES = ("data", "forward", "gather_loss", "enqueue", "backward", "optimizer")
HELD_OUT = 50  # validation and test subjects each


@contextmanager
def local_ray() -> Iterator[None]:
    """A local Ray cluster (started by the first run) that is shut down afterwards."""
    use_local_ray_settings()
    import ray

    try:
        yield
    finally:
        ray.shutdown()


def synthetic_shards(root: str, train_subjects: int) -> str:
    """``train_subjects`` synthetic subjects (plus held-out ones) sharded under ``root``."""
    from sharding.writer import write_shards

    shards = f"{root}/shards"
    write_shards(f"synth:{train_subjects + 2 * HELD_OUT}:0", shards, subjects_per_shard=100,
                 val_subjects=HELD_OUT, test_subjects=HELD_OUT)
    return shards


def run_config(shards: str, root: str, name: str, steps: int, overrides: Sequence[str] = ()) -> TrainConfig:
    """``cpu-local.yaml`` for ``steps`` steps of one epoch on ``shards``, only the last step logged."""
    return TrainConfig.load(
        CONFIG,
        [
            f"data.shards={shards}", f"run.storage={root}/runs", f"run.name={name}", "train.epochs=1",
            f"train.max_steps={steps}", f"train.log_every={steps}", "wandb.enabled=false", *overrides,
        ],
    )


def last_step_metrics(config: TrainConfig) -> dict[str, Any]:
    """Train ``config`` and return the metrics of its last step."""
    from pipeline.training import train

    return train(config, show_progress=False).metrics


def describe(config: TrainConfig) -> str:
    """The model, batch and precision that a table's numbers are for."""
    return (f"{config.model.name} {config.model.options}, length {config.data.max_len}, {config.loss.name} loss, "
            f"P×K = {config.data.subjects_per_batch}×{config.data.sessions_per_subject} per rank, fp32, gloo")


def split_header() -> str:
    return " ".join(f"{phase:>12}" for phase in PHASES)


def split_cells(metrics: dict[str, Any]) -> str:
    """Seconds of each of :data:`PHASES` in the logged step."""
    return " ".join(f"{metrics[f'time/{phase}']:12.3f}" for phase in PHASES)
