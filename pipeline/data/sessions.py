"""Evaluation stream: every session of every subject of a split, each exactly once across ranks."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from pipeline.data.batch import Batch, Row, batch_of_rows, current_worker, data_loader, distributed_env, make_batch
from pipeline.data.features import DEFAULT_FEATURES, check_features
from pipeline.data.shards import ShardIntegrityError, ShardSet, assign_shards
from sharding.format import ShardInfo, decode_subject


class SessionDataset(IterableDataset):
    """One rank's sessions in fixed order (shards, subjects, sessions), ``batch_size`` per batch."""

    def __init__(
        self, shard_set: ShardSet, split: str, batch_size: int, max_len: int,
        features: Sequence[str], rank: int, world_size: int, num_workers: int,
    ) -> None:
        self.shard_set, self.batch_size = shard_set, batch_size
        self.max_len, self.features = max_len, check_features(features)
        self.rank, self.num_workers = rank, num_workers
        self.subject_ids = shard_set.subjects(split)
        self.labels = {s: i for i, s in enumerate(self.subject_ids)}
        workers = max(num_workers, 1)
        groups = assign_shards(
            shard_set.shards(split), world_size * workers, np.random.default_rng(0xE7A1),
            size=lambda shard: shard.sessions, allow_empty=True,
        )
        self.readers: list[list[list[ShardInfo]]] = [
            groups[r * workers : (r + 1) * workers] for r in range(world_size)
        ]

    def batches(self, rank: int) -> int:
        """Batches rank ``rank`` yields, from the manifest's session counts."""
        return sum(math.ceil(sum(s.sessions for s in g) / self.batch_size) for g in self.readers[rank])

    def __iter__(self) -> Iterator[Batch]:
        rows: list[Row] = []
        for shard in self.readers[self.rank][current_worker(self.num_workers)]:
            for label, _, sample in self.shard_set.labelled_samples(shard, self.labels):
                subject = decode_subject(sample)
                for session_id, session in zip(subject.session_ids, subject.sessions):
                    rows.append((session, label, subject.subject_id, session_id))
                    if len(rows) == self.batch_size:
                        yield self._build(rows)
                        rows = []
        if rows:
            yield self._build(rows)

    def _build(self, rows: list[Row]) -> Batch:
        return batch_of_rows(rows, self.features, self.max_len)

    def empty(self) -> Batch:
        """A zero-row batch: what a rank that ran out of sessions yields to keep step with the others."""
        return make_batch([], [], [], [], self.features, self.max_len)


class SessionLoader:
    """Iterable over this rank's share of a split's sessions, for validation metrics.

    Every rank yields ``batches_per_rank`` batches (known from the manifest): a rank with fewer
    sessions ends with empty batches (zero rows), so per-batch collectives cannot deadlock.
    Across ranks every session of the split appears exactly once.

    ``pin_memory=True`` pins each batch for an asynchronous copy to a GPU
    (``Batch.to(device, non_blocking=True)``); pass ``pin_memory=device.type == "cuda"``.
    Workers (``num_workers``) are started per iteration: an evaluation is one pass, and workers
    kept between validations would hold memory through the training steps in between.
    """

    def __init__(
        self,
        url: str,
        split: str = "val",
        *,
        batch_size: int = 1024,
        max_len: int = 100,
        features: Sequence[str] = DEFAULT_FEATURES,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        rank, world_size = distributed_env(rank, world_size)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.shard_set = ShardSet(url, storage_options)
        self.dataset = SessionDataset(
            self.shard_set, split, batch_size, max_len, features, rank, world_size, num_workers
        )
        self.batches_per_rank = max(self.dataset.batches(r) for r in range(world_size))

    @property
    def subject_ids(self) -> list[str]:
        return self.dataset.subject_ids

    def __len__(self) -> int:
        return self.batches_per_rank

    def __iter__(self) -> Iterator[Batch]:
        count = 0
        for batch in data_loader(self.dataset, self.num_workers, self.pin_memory):
            count += 1
            yield batch
        if count != self.dataset.batches(self.dataset.rank):
            raise ShardIntegrityError(
                f"rank {self.dataset.rank} read {count} batches where the manifest's session counts "
                f"give {self.dataset.batches(self.dataset.rank)}: the shards do not match the manifest"
            )
        for _ in range(self.batches_per_rank - count):
            yield self.dataset.empty()
