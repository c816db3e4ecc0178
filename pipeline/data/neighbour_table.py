"""Hard-subject batches (``data.hard_batches``, docs/design.md §8): which subjects a batch holds
when it is built around seed subjects and their nearest subjects by embedding centroid.

The *neighbour table* maps each subject to the subjects of its own reader (the same shards, so
batches stay subject-disjoint across ranks), nearest centroid first. It is computed with the model
(:mod:`pipeline.training.hard_batches`), handed to the loader at an epoch's start and saved with the
loader's state, because a batch depends on (seed, epoch, table): a resume replays the same draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import HardBatchesSection


@dataclass(frozen=True)
class NeighbourTable:
    """Each subject's nearest subjects (global labels, nearest first), computed at ``epoch``'s start."""

    epoch: int
    nearest: dict[int, list[int]]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "nearest": self.nearest}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "NeighbourTable":
        return cls(int(state["epoch"]), {int(k): [int(v) for v in vs] for k, vs in state["nearest"].items()})


def neighbours_at(settings: HardBatchesSection, step: int) -> int:
    """Neighbours per seed subject for the batch trained after ``step`` steps: none before
    ``start_step``, then ``start`` growing linearly to ``cap`` over ``ramp_steps`` (easy batches
    first, as in Type2Branch's curriculum)."""
    if not settings.enabled or step < settings.start_step:
        return 0
    ramp = 1.0 if settings.ramp_steps == 0 else min(1.0, (step - settings.start_step) / settings.ramp_steps)
    return settings.start + int(ramp * (settings.cap - settings.start))


def active_neighbours(table: NeighbourTable, settings: HardBatchesSection, count: int) -> Callable[[int], list[int]]:
    """A subject's neighbours in force: its ``count`` nearest after the ``passed_over`` closest."""
    first = settings.passed_over
    return lambda label: table.nearest.get(label, [])[first : first + count]


def pick_hard(
    labels: Sequence[int], size: int, seeds: int, rng: np.random.Generator, neighbours: Callable[[int], list[int]]
) -> np.ndarray:
    """Indices into ``labels`` (a reader's buffer): ``seeds`` random seed subjects, each followed by
    its neighbours that are at hand (buffered and not yet picked), then random subjects up to
    ``size``. A neighbour already drawn this epoch has left the buffer, so late in an epoch a seed
    may bring fewer; the random fill keeps every batch at ``size`` subjects."""
    where = {label: i for i, label in enumerate(labels)}
    picked: list[int] = []
    for _ in range(seeds):
        free = np.setdiff1d(np.arange(len(labels)), picked)
        seed = int(free[rng.integers(len(free))])
        picked.append(seed)
        picked += [where[n] for n in neighbours(labels[seed]) if n in where and where[n] not in picked]
    free = np.setdiff1d(np.arange(len(labels)), picked)
    return np.concatenate([np.asarray(picked, dtype=np.int64), rng.choice(free, size - len(picked), replace=False)])


def neighbour_share(subjects: Sequence[int], neighbours: Callable[[int], list[int]]) -> float:
    """The share of a batch's subjects that are a neighbour in force of another subject in it."""
    present = set(subjects)
    linked = {n for s in present for n in neighbours(s) if n in present and n != s}
    return len(linked) / max(1, len(present))
