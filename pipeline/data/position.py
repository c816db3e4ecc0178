"""Where an iteration of the training stream starts, shared with the loader's kept workers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.neighbour_table import NeighbourTable


@dataclass(frozen=True)
class Position:
    """Where an iteration of the stream starts: ``step`` batches of ``epoch`` are done; the
    hard batches' neighbour table in force, if any."""

    epoch: int
    step: int
    neighbours: NeighbourTable | None = None


class SharedPosition:
    """The next iteration's :class:`Position` in shared memory: the loader writes it before each
    iteration, and each DataLoader worker reads it as its iteration starts.

    Why shared memory: the loader keeps its workers for its whole life (a worker started per
    epoch forks the training process again), and a kept worker iterates its own copy of the
    dataset, made when it started, so attributes set later on the loader's copy never reach it.
    Tensors moved to shared memory before the workers start are the same memory in all of them
    (forked or spawned), and the DataLoader tells a worker to start an iteration only at the
    loader's ``iter``, after the write. The DataLoader has no channel of its own to send a
    worker anything, and restarting the workers whenever the position changes would undo the point.

    The table is kept as ``depth`` labels per subject padded with -1: a batch uses at most a
    subject's ``passed_over + cap`` nearest (``active_neighbours``), so a longer list loses nothing.
    With hard batches off the depth is 0: no table is kept.
    """

    def __init__(self, subjects: int, depth: int) -> None:
        self.numbers = torch.zeros(4, dtype=torch.int64).share_memory_()  # epoch, step, has table, its epoch
        self.nearest = torch.full((subjects, depth), -1, dtype=torch.int64).share_memory_()

    def write(self, position: Position) -> None:
        table = position.neighbours
        if table is not None:
            self.nearest.copy_(torch.from_numpy(_padded(table.nearest, *self.nearest.shape)))
        has_table, table_epoch = (0, 0) if table is None else (1, table.epoch)
        self.numbers.copy_(torch.tensor([position.epoch, position.step, has_table, table_epoch]))

    def read(self) -> Position:
        epoch, step, has_table, table_epoch = self.numbers.tolist()
        return Position(epoch, step, NeighbourTable(table_epoch, _unpadded(self.nearest)) if has_table else None)


def _padded(nearest: dict[int, list[int]], subjects: int, depth: int) -> np.ndarray:
    rows = np.full((subjects, depth), -1, dtype=np.int64)
    for label, near in nearest.items():
        kept = near[:depth]
        rows[label, : len(kept)] = kept
    return rows


def _unpadded(rows: torch.Tensor) -> dict[int, list[int]]:
    nearest = {label: [n for n in row if n >= 0] for label, row in enumerate(rows.tolist())}
    return {label: near for label, near in nearest.items() if near}
