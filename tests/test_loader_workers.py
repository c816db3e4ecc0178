"""The training loader's DataLoader workers live as long as the loader: every epoch and a resume on
the same loader reuse them, and still start where the loader is (its epoch, step and neighbour
table); no loader draws from torch's global generator; with CUDA, batches come pinned."""

from __future__ import annotations

import itertools
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.config import HardBatchesSection
from pipeline.data import SessionLoader, SubjectBatchLoader
from pipeline.data.neighbour_table import NeighbourTable
from tests.shards_fixture import write_shard_set
from tests.test_data import UNEVEN, P, config, epoch, same
from tests.test_hard_batches import HARD, ring_table

WORKERS = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shard_set(root, UNEVEN, sessions=lambda i: 15)
    return root


def make(root: Path, hard: bool, num_workers: int = WORKERS, pin_memory: bool = False) -> SubjectBatchLoader:
    """Rank 0 of 2; with ``hard``, hard batches from the first step (a table changes the batches)."""
    settings = config(hard_batches=HARD if hard else HardBatchesSection(), shuffle_buffer=P)
    return SubjectBatchLoader(str(root), config=settings, rank=0, world_size=2, num_workers=num_workers,
                              pin_memory=pin_memory)


def tables(stream: SubjectBatchLoader, hard: bool) -> list[NeighbourTable | None]:
    """Epoch 0's and epoch 1's tables: with hard batches, two orders of the nearest subjects."""
    if not hard:
        return [None, None]
    first = ring_table(stream)
    return [first, NeighbourTable(1, {label: near[::-1] for label, near in first.nearest.items()})]


def fresh_epoch(root: Path, hard: bool, index: int, table: NeighbourTable | None) -> list:
    """Epoch ``index`` with ``table`` in force, from a new loader whose workers start for it."""
    stream = make(root, hard)
    stream.set_epoch(index)
    stream.neighbours = table
    return epoch(stream)


def children() -> set[int]:
    """This process's children: a loader's workers, and those of other loaders not yet dropped."""
    return {child.pid for child in psutil.Process().children()}


@pytest.mark.parametrize("hard", [False, True])
def test_workers_are_kept_across_epochs_and_a_resume_and_start_where_the_loader_is(shards: Path, hard: bool) -> None:
    before = children()
    kept = make(shards, hard)
    first_table, second_table = tables(kept, hard)
    kept.neighbours = first_table
    epoch(kept)
    workers = children() - before
    kept.neighbours = second_table  # set between epochs, it must reach the kept workers
    second = epoch(kept)
    assert len(workers) == WORKERS and workers <= children()  # the same processes, still running
    assert same(second, fresh_epoch(shards, hard, 1, second_table))
    if hard:
        assert not same(second, fresh_epoch(shards, hard, 1, first_table))

    list(itertools.islice(kept, 2))  # epoch 2, left mid-way: the kept workers are mid-epoch
    kept.load_state_dict({**kept.state_dict(), "epoch": 1, "step": 3})  # back to epoch 1's step 3
    assert same(epoch(kept), second[3:])
    assert workers <= children()


@pytest.mark.parametrize("num_workers", [0, WORKERS])
def test_iterating_the_loaders_leaves_torchs_global_generator_alone(shards: Path, num_workers: int) -> None:
    """A DataLoader draws its workers' seed at each new iterator: drawn from the global generator,
    it would shift the training's dropout by the loader's iterations, which a resume does not replay."""
    state = torch.get_rng_state()
    stream = make(shards, False, num_workers)
    epoch(stream)
    list(itertools.islice(stream, 2))
    list(SessionLoader(str(shards), "val", rank=0, world_size=1, num_workers=num_workers))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
@pytest.mark.parametrize("num_workers", [0, WORKERS])
def test_with_pin_memory_batches_come_pinned_and_copy_asynchronously(shards: Path, num_workers: int) -> None:
    train = next(iter(make(shards, False, num_workers, pin_memory=True)))
    val = next(iter(SessionLoader(str(shards), "val", rank=0, world_size=1, num_workers=num_workers,
                                  pin_memory=True)))
    for batch in (train, val):
        assert batch.features.is_pinned() and batch.mask.is_pinned() and batch.labels.is_pinned()
        moved = batch.to(torch.device("cuda"), non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(moved.features.cpu(), batch.features) and torch.equal(moved.labels.cpu(), batch.labels)
