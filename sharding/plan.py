"""The subject-level split and the shard assignment: a pure function, cheap to import."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sharding.format import SPLITS

DEFAULT_SUBJECTS_PER_SHARD = 1000
MAX_DEFAULT_HOLDOUT = 1000


class ShardingError(RuntimeError):
    """The output folder holds a different job, or the job's options are impossible."""


@dataclass(frozen=True)
class PlannedShard:
    name: str
    split: str
    subjects: tuple[str, ...]


def default_holdout(n_subjects: int) -> int:
    """Default val (and test) size: 10 % of the subjects, at most 1,000 (as Type2Branch)."""
    return min(MAX_DEFAULT_HOLDOUT, n_subjects // 10)


def plan_shards(subject_ids: Sequence[str], *, seed: int, subjects_per_shard: int,
                val_subjects: int | None = None, test_subjects: int | None = None,
                ) -> list[PlannedShard]:
    """Subject-level split and shard assignment, a pure function of its arguments.

    The sorted ids are permuted by ``seed``; the first ``val_subjects`` go to val, the next
    ``test_subjects`` to test, the rest to train; each split is cut in order into shards of
    ``subjects_per_shard``. No subject can land in two splits.
    """
    if subjects_per_shard < 1:
        raise ShardingError("--subjects-per-shard must be at least 1")
    n = len(subject_ids)
    n_val = default_holdout(n) if val_subjects is None else val_subjects
    n_test = default_holdout(n) if test_subjects is None else test_subjects
    if min(n_val, n_test) < 0 or n_val + n_test >= n:
        raise ShardingError(f"cannot hold out {n_val} val + {n_test} test subjects of {n}: "
                            "no training subjects would be left")
    ordered = sorted(subject_ids)
    permuted = [ordered[i] for i in np.random.default_rng(seed).permutation(n)]
    splits = {"val": permuted[:n_val], "test": permuted[n_val:n_val + n_test],
              "train": permuted[n_val + n_test:]}
    return [
        PlannedShard(f"{split}-{k // subjects_per_shard:06d}.tar", split,
                     tuple(splits[split][k:k + subjects_per_shard]))
        for split in SPLITS
        for k in range(0, len(splits[split]), subjects_per_shard)
    ]
