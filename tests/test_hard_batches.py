"""Hard-subject batches (``data.hard_batches``): seeds and their neighbours, the neighbour count's
schedule, today's batches when off, exact resume with the table in force (also through DataLoader
workers), and the table computed with a model: every subject, neighbours from its own reader."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import HardBatchesSection, TrainConfig
from pipeline.data import SubjectBatchLoader
from pipeline.data.neighbour_table import NeighbourTable, neighbour_share, neighbours_at
from pipeline.training.hard_batches import HardBatches, nearest_subjects
from tests.shards_fixture import write_shard_set
from tests.test_data import UNEVEN, K, P, config, epoch, same

HARD = HardBatchesSection(enabled=True, seeds=1, start=1, cap=2, start_step=0, ramp_steps=0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shard_set(root, UNEVEN, sessions=lambda i: 15)
    return root


def loader(root: Path, hard: HardBatchesSection = HARD, num_workers: int = 0, **overrides) -> SubjectBatchLoader:
    """Rank 0 of 2, with the smallest shuffle buffer: hard batches buffer a reader's every subject."""
    settings = config(**{"hard_batches": hard, "shuffle_buffer": P, **overrides})
    return SubjectBatchLoader(str(root), config=settings, rank=0, world_size=2, num_workers=num_workers)


def reader_subjects(stream: SubjectBatchLoader) -> list[list[int]]:
    labels = {subject: i for i, subject in enumerate(stream.subject_ids)}
    return [sorted(label for shard in shards for label, _, _ in stream.shard_set.labelled_samples(shard, labels))
            for shards in stream.readers]


def ring_table(stream: SubjectBatchLoader, depth: int = 4) -> NeighbourTable:
    """Each subject's neighbours: the subjects after it in its reader, in label order."""
    nearest = {}
    for subjects in reader_subjects(stream):
        for i, label in enumerate(subjects):
            nearest[label] = [subjects[(i + j) % len(subjects)] for j in range(1, depth + 1)]
    return NeighbourTable(0, nearest)


def blocks(batch) -> list[int]:
    """The batch's subjects, in block order."""
    return batch.labels[::K].tolist()


def assert_seeds_then_neighbours(batches: list, table: NeighbourTable, counts: list[int]) -> None:
    """Each batch: its seed, then the seed's ``count`` nearest not drawn earlier in the epoch
    (a drawn subject has left the buffer), then random subjects up to P."""
    used: set[int] = set()
    for batch, count in zip(batches, counts, strict=True):
        seed, *rest = blocks(batch)
        expected = [n for n in table.nearest[seed][:count] if n not in used]
        assert rest[: len(expected)] == expected
        assert len(set(blocks(batch))) == P
        used |= set(blocks(batch))


def test_each_batch_is_a_seed_then_its_neighbours_still_unused_this_epoch_then_random_subjects(shards):
    stream = loader(shards)
    stream.neighbours = table = ring_table(stream)
    assert_seeds_then_neighbours(epoch(stream), table, [HARD.cap] * stream.batches_per_epoch)


def test_semihard_neighbours_pass_over_the_closest_subjects(shards):
    semihard = HardBatchesSection(enabled=True, seeds=1, start=2, cap=2, kind="semihard", skip=2)
    stream = loader(shards, semihard)
    stream.neighbours = table = ring_table(stream)
    seed, *rest = blocks(next(iter(stream)))
    assert rest[:2] == table.nearest[seed][2:4]


def test_the_neighbour_count_is_zero_then_grows_from_start_to_cap_over_the_ramp():
    ramp = HardBatchesSection(enabled=True, seeds=1, start=1, cap=3, start_step=2, ramp_steps=4)
    assert [neighbours_at(ramp, step) for step in range(9)] == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert neighbours_at(HardBatchesSection(enabled=False), 100) == 0


def test_batches_follow_the_count_of_their_global_step(shards):
    """Epoch 1's steps continue epoch 0's: its first batch is trained after a full epoch of steps."""
    stream = loader(shards)
    ramp = HardBatchesSection(enabled=True, seeds=1, start=0, cap=2, start_step=stream.batches_per_epoch,
                              ramp_steps=4)
    stream = loader(shards, ramp)
    stream.neighbours = table = ring_table(stream)
    stream.set_epoch(1)
    counts = [neighbours_at(ramp, stream.batches_per_epoch + step) for step in range(stream.batches_per_epoch)]
    assert counts[:6] == [0, 0, 1, 1, 2, 2]
    assert_seeds_then_neighbours(epoch(stream), table, counts)


def test_off_the_batches_are_todays_and_before_the_schedule_starts_they_are_random(shards):
    today = epoch(loader(shards, HardBatchesSection()))
    off = loader(shards, HardBatchesSection())
    off.neighbours = ring_table(off)
    assert same(epoch(off), today)
    random_from_whole_readers = epoch(loader(shards, HardBatchesSection(), shuffle_buffer=200))
    waiting = loader(shards, HardBatchesSection(enabled=True, start_step=10_000))
    waiting.neighbours = ring_table(waiting)
    assert same(epoch(waiting), random_from_whole_readers)
    hard = loader(shards)
    hard.neighbours = ring_table(hard)
    assert not same(epoch(hard), random_from_whole_readers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resume_mid_epoch_restores_the_table_and_gives_the_uninterrupted_batches(shards, num_workers):
    """With loader workers the table travels to the worker processes with the dataset."""
    make = lambda: loader(shards, num_workers=num_workers)  # noqa: E731
    reference = make()
    reference.neighbours = table = ring_table(reference)
    uninterrupted = epoch(reference)
    seed, first, *_ = blocks(uninterrupted[0])
    assert first == table.nearest[seed][0]

    interrupted = make()
    interrupted.neighbours = ring_table(interrupted)
    head = list(itertools.islice(interrupted, 3))
    state = interrupted.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.neighbours == interrupted.neighbours
    assert same(head + epoch(resumed), uninterrupted)


def test_the_table_is_computed_with_the_model_for_every_subject_within_its_reader(shards):
    from pipeline.models import build_model

    train = TrainConfig.load(None, [f"data.shards={shards}", "data.hard_batches.enabled=true",
                                    "data.hard_batches.cap=3", "data.max_len=20"])
    stream = loader(shards)
    torch.manual_seed(0)
    model = build_model("bigru", features=tuple(train.data.features), embedding_size=16, hidden=8)
    hard = HardBatches(train, stream, model)
    hard.refresh()
    table = stream.neighbours
    assert table is not None and table.epoch == 0 and hard.centroid_seconds > 0
    for subjects in reader_subjects(stream):
        assert sorted(s for s in table.nearest if s in subjects) == subjects
        for subject in subjects:
            assert len(table.nearest[subject]) == 3 and set(table.nearest[subject]) <= set(subjects) - {subject}
    hard.refresh()  # the same epoch: the table in force stays
    assert stream.neighbours is table
    stream.set_epoch(1)
    hard.refresh()
    assert stream.neighbours.epoch == 1


def test_the_table_is_recomputed_every_every_epochs(shards):
    train = TrainConfig.load(None, [f"data.shards={shards}", "data.hard_batches.enabled=true",
                                    "data.hard_batches.every_epochs=2"])
    stream = loader(shards)
    hard = HardBatches(train, stream, torch.nn.Linear(1, 1))
    hard._centroids = lambda shards, reader: (np.array([reader]), torch.zeros(1, 2))  # no model needed
    epochs = []
    for epoch_index in range(5):
        stream.set_epoch(epoch_index)
        hard.refresh()
        epochs.append(stream.neighbours.epoch)
    assert epochs == [0, 0, 2, 2, 4]


def test_the_neighbour_share_counts_subjects_that_are_another_ones_neighbour():
    table = {1: [2, 3], 2: [1], 4: [5]}
    assert neighbour_share([1, 2, 3, 6], lambda s: table.get(s, [])) == 3 / 4


def test_nearest_subjects_are_ordered_by_centroid_distance():
    labels = np.array([7, 3, 9, 5])
    centroids = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert nearest_subjects(labels, centroids, 2) == {7: [3, 9], 3: [7, 9], 9: [3, 7], 5: [9, 3]}
