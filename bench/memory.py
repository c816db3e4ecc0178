"""Training with a cross-batch memory: sessions/s and where a step goes with ``loss.memory.size``
0, 16,384 and 65,536 rows, and what the momentum encoder costs.

Every arm trains ``configs/cpu-local.yaml`` (2 Ray/DeepSpeed workers, global batch
2 × 16 subjects × 8 sessions = 256 rows) on the same shards in this one process, so its
sessions/s is printed as a ratio against the arm without a memory.

With ``loss.memory.start_step=0`` the queue grows by one global batch per step, so an arm of
size M runs ⌈M / 256⌉ + 1 steps (at least :data:`MIN_STEPS`): its last step, the one measured,
scores the batch against the full queue of M rows (earlier steps would time a smaller memory).
Filling 65,536 rows takes 257 steps; they are most of the benchmark's run time.

The split of that step, on rank 0's clock: ``data``, ``forward`` (the model), ``gather_loss``
(the all-gather and the loss, the memory's pairs included), ``enqueue`` (the batch joins the
queue; the momentum encoder embeds and all-gathers it first), ``backward``, ``optimizer`` (with
the momentum encoder's weight average). The momentum
encoder's own time (``time/momentum_encoder``: embedding plus averaging) is a column too, and an
arm with ``encoder=current`` (the model's own embeddings queued) at 16,384 rows isolates it.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from typing import Any

from bench._training import (
    CONFIG,
    describe,
    last_step_metrics,
    local_ray,
    run_config,
    split_cells,
    split_header,
    synthetic_shards,
)
from pipeline.config import TrainConfig

MIN_STEPS = 20  # as bench/train.py: the first steps of a run are slower
# Synthetic subjects written per subject the steps draw: an epoch loses the subjects with fewer
# than K sessions and every reader's remainder (8,500 subjects give 250 batches of 32, not 265).
CORPUS_MARGIN = 1.1


@dataclass(frozen=True)
class Arm:
    """One run: a memory of ``size`` rows (0: none) filled by ``encoder``."""

    size: int
    encoder: str = "momentum"

    @property
    def label(self) -> str:
        return f"{self.size:,} {self.encoder}" if self.size else "0 (reference)"

    def steps(self, global_batch: int) -> int:
        """Steps until the last one scores a full queue (the queue holds the batches of the steps before)."""
        return max(MIN_STEPS, math.ceil(self.size / global_batch) + 1)

    def overrides(self) -> list[str]:
        return [f"loss.memory.size={self.size}", "loss.memory.start_step=0", f"loss.memory.encoder={self.encoder}"]


ARMS = (Arm(0), Arm(16_384), Arm(65_536), Arm(16_384, "current"))


def global_batch(config: TrainConfig) -> int:
    """Rows one step adds to the queue: every rank's P × K sessions."""
    return config.data.subjects_per_batch * config.data.sessions_per_subject * config.train.num_workers


def measure(arms: tuple[Arm, ...]) -> tuple[TrainConfig, list[tuple[Arm, dict[str, Any]]]]:
    """Train every arm on one synthetic corpus large enough that the longest arm fits in an epoch;
    the config of the last arm and each arm's last-step metrics."""
    base = TrainConfig.load(CONFIG)
    batch, subjects_per_step = global_batch(base), base.data.subjects_per_batch * base.train.num_workers
    longest = max(arm.steps(batch) for arm in arms)
    rows = []
    with tempfile.TemporaryDirectory() as root, local_ray():
        shards = synthetic_shards(root, math.ceil(CORPUS_MARGIN * (longest + 2) * subjects_per_step))
        for arm in arms:
            steps = arm.steps(batch)
            config = run_config(shards, root, f"memory-{arm.size}-{arm.encoder}", steps, arm.overrides())
            metrics = last_step_metrics(config)
            if metrics["step"] != steps:
                raise RuntimeError(f"{arm.label}: the run stopped at step {metrics['step']}, not {steps}")
            rows.append((arm, metrics))
    return config, rows


def table(config: TrainConfig, rows: list[tuple[Arm, dict[str, Any]]]) -> str:
    """One line per arm; sessions/s also as a ratio against the first arm's."""
    reference = rows[0][1]["train/sessions_per_s"]
    lines = [
        f"{describe(config)}; the last step of each run, its queue full",
        f"{'memory':>16} {'rows':>7} {'steps':>5} {'sessions/s':>10} {'× ref':>6} {'step s':>7} "
        f"{split_header()} {'momentum enc':>12}",
    ]
    for arm, metrics in rows:
        sessions = metrics["train/sessions_per_s"]
        lines.append(
            f"{arm.label:>16} {metrics.get('train/memory_rows', 0):>7,.0f} {metrics['step']:>5} {sessions:>10.0f} "
            f"{sessions / reference:>6.2f} {metrics['train/step_time']:>7.3f} {split_cells(metrics)} "
            f"{metrics.get('time/momentum_encoder', 0.0):>12.3f}"
        )
    return "\n".join(lines)


def main(arms: tuple[Arm, ...] = ARMS) -> None:
    print(table(*measure(arms)))


if __name__ == "__main__":
    main()
