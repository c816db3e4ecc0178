"""The subject-level split and the shard assignment: a pure function, cheap to import.

Shard size: training reads the train split through ``ranks × loader workers`` readers, each
of which needs at least one whole shard, and a set whose splits hold one shard each cannot be
trained on. So by default (``subjects_per_shard=None``) each split is cut into
``max(ceil(n / MAX_SUBJECTS_PER_SHARD), min(MIN_SHARDS[split], n))`` shards of near-equal
size (sizes differ by at most one): large corpora get shards of at most 128 subjects, small
ones still get 8 train shards and 2 val/test shards when they have that many subjects. An
explicit ``subjects_per_shard`` cuts every split into shards of exactly that size (the last
one smaller), as before this rule existed.

Why 128 and not the former 1,000 (``FORMER_MAX_SUBJECTS_PER_SHARD``): with 1,000 the KVC
desktop training split (113,120 subjects) made 114 shards, too few for 32 GPUs × 4 loader
workers, and mobile (38,639) made 39. With 128 they make 884 and 302 shards: every reader
count up to 256 (64 GPUs × 4 loader workers) is fed, and readers get several shards each, so
their subject counts, hence the subjects an epoch visits, stay even. Training takes a set's
shards from its manifest, so a set written with the former cap trains as it is; re-planning
it (to repair or resume writing it) needs that cap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sharding.format import SPLITS

MAX_SUBJECTS_PER_SHARD = 128  # ≈ 2 MB of keystrokes: two batches of 64 subjects
FORMER_MAX_SUBJECTS_PER_SHARD = 1000  # the automatic rule's former cap (≈ 15 MB): sets planned with it
MIN_SHARDS = {"train": 8, "val": 2, "test": 2}  # 8 train readers: 2 ranks × 4 loader workers
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


def check_options(*, subjects_per_shard: int | None = None, val_subjects: int | None = None,
                  test_subjects: int | None = None, split: str | None = None,
                  workers: int = 1) -> None:
    """Refuse impossible options, naming the option, before anything is read or written."""
    for option, value, least in (("--subjects-per-shard", subjects_per_shard, 1),
                                 ("--val-subjects", val_subjects, 0),
                                 ("--test-subjects", test_subjects, 0), ("--workers", workers, 1)):
        if value is not None and value < least:
            raise ShardingError(f"{option} must be at least {least}, got {value}")
    if split is not None:
        if split not in SPLITS:
            raise ShardingError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
        if val_subjects is not None or test_subjects is not None:
            raise ShardingError("--split puts every subject in one split; "
                                "it cannot be combined with --val-subjects or --test-subjects")


def split_subjects(subject_ids: Sequence[str], *, seed: int, val_subjects: int | None = None,
                   test_subjects: int | None = None, split: str | None = None,
                   ) -> dict[str, list[str]]:
    """Subjects per split: sorted ids permuted by ``seed``; val first, then test, then train.

    ``split`` sends every subject to that one split (an evaluation-only set).
    """
    n = len(subject_ids)
    if n == 0:
        raise ShardingError("the source holds no subjects")
    ordered = sorted(subject_ids)
    permuted = [ordered[i] for i in np.random.default_rng(seed).permutation(n)]
    if split is not None:
        return {name: permuted if name == split else [] for name in SPLITS}
    n_val = default_holdout(n) if val_subjects is None else val_subjects
    n_test = default_holdout(n) if test_subjects is None else test_subjects
    if n_val + n_test >= n:
        raise ShardingError(f"cannot hold out {n_val} val + {n_test} test subjects of {n}: "
                            "no training subjects would be left (for an evaluation-only set "
                            "use --split test)")
    return {"val": permuted[:n_val], "test": permuted[n_val:n_val + n_test],
            "train": permuted[n_val + n_test:]}


def shard_sizes(split: str, n: int, subjects_per_shard: int | None,
                max_subjects_per_shard: int = MAX_SUBJECTS_PER_SHARD) -> list[int]:
    """Subjects in each of the split's shards, in order (see the module docstring).

    ``max_subjects_per_shard`` is the automatic rule's cap: the default for new sets,
    :data:`FORMER_MAX_SUBJECTS_PER_SHARD` to re-plan a set written before it changed.
    """
    if subjects_per_shard is not None:
        return [min(subjects_per_shard, n - k) for k in range(0, n, subjects_per_shard)]
    count = max(math.ceil(n / max_subjects_per_shard), min(MIN_SHARDS[split], n))
    return [n // count + (i < n % count) for i in range(count)] if n else []


def plan_shards(subject_ids: Sequence[str], *, seed: int, subjects_per_shard: int | None = None,
                val_subjects: int | None = None, test_subjects: int | None = None,
                split: str | None = None,
                max_subjects_per_shard: int = MAX_SUBJECTS_PER_SHARD) -> list[PlannedShard]:
    """Subject-level split and shard assignment, a pure function of its arguments.

    Each split is cut in order into shards of :func:`shard_sizes`. No subject can land in two
    splits.
    """
    check_options(subjects_per_shard=subjects_per_shard, val_subjects=val_subjects,
                  test_subjects=test_subjects, split=split)
    splits = split_subjects(subject_ids, seed=seed, val_subjects=val_subjects,
                            test_subjects=test_subjects, split=split)
    plan = []
    for name in SPLITS:
        sizes = shard_sizes(name, len(splits[name]), subjects_per_shard, max_subjects_per_shard)
        bounds = np.cumsum([0, *sizes])
        plan += [PlannedShard(f"{name}-{i:06d}.tar", name, tuple(splits[name][a:b]))
                 for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return plan
