"""What the loaders yield, and the plumbing both loaders share (rank discovery, the DataLoader)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.features import featurize


class Batch(NamedTuple):
    """One batch of sessions. Rows of a training batch are subject-major: P blocks of K rows.

    ``labels`` are global integers (the subject's index in the split's sorted subject list, see
    ``ShardSet.subjects``), equal for the same subject on every rank, so gathered labels compare.
    """

    features: torch.Tensor  # float32 [B, L, F]
    mask: torch.Tensor  # bool [B, L], True on real keys
    labels: torch.Tensor  # int64 [B]
    subject_ids: list[str]  # [B]
    session_ids: list[str]  # [B]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._replace(
            features=self.features.to(device, non_blocking=non_blocking),
            mask=self.mask.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
        )


def make_batch(
    sessions: Sequence[np.ndarray],
    labels: Sequence[int],
    subject_ids: list[str],
    session_ids: list[str],
    features: Sequence[str],
    max_len: int,
) -> Batch:
    values, mask = featurize(sessions, features, max_len)
    return Batch(
        torch.from_numpy(values),
        torch.from_numpy(mask),
        torch.as_tensor(np.asarray(labels, dtype=np.int64)),
        subject_ids,
        session_ids,
    )


Row = tuple[np.ndarray, int, str, str]  # one session: (keystrokes, label, subject id, session id)


def batch_of_rows(rows: Sequence[Row], features: Sequence[str], max_len: int) -> Batch:
    """A batch of sessions gathered row by row (evaluation, centroids)."""
    sessions, labels, subjects, session_ids = (list(column) for column in zip(*rows))
    return make_batch(sessions, labels, subjects, session_ids, features, max_len)


def distributed_env(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: explicit values, else ``RANK``/``WORLD_SIZE`` as Ray Train sets them."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


def current_worker(num_workers: int) -> int:
    """This DataLoader worker's index, checked against the worker count the plan was made for."""
    info = get_worker_info()
    worker, count = (0, 1) if info is None else (info.id, info.num_workers)
    if count != max(num_workers, 1):
        raise RuntimeError(
            f"dataset planned for {num_workers} loader workers is iterated by {count}; "
            "iterate it through its loader object"
        )
    return worker


def data_loader(
    dataset: IterableDataset, num_workers: int, pin_memory: bool, persistent: bool = False
) -> DataLoader:
    """The dataset's batches: read in-process with no workers, else fanned out to workers.

    The DataLoader keeps order deterministic: it asks workers round-robin and skips those that
    are done, so step ``i`` comes from the worker a plan can compute (see ``Plan.order``).

    ``pin_memory`` puts each batch in page-locked memory, so that ``Batch.to(device,
    non_blocking=True)`` copies it to a GPU while the host goes on; it only means something with
    CUDA, so callers pass ``pin_memory=device.type == "cuda"``. ``persistent`` keeps the workers
    from one iteration to the next (the dataset must then tell them where an iteration starts
    by other means than its attributes: each worker iterates its own copy).

    The DataLoader gets a generator of its own: it draws its workers' base seed at each new
    iterator, which from torch's global generator would shift the training's random stream
    (dropout) by the loader's iterations, and a resumed run would not draw the same. The
    datasets draw nothing from the workers' seeds (the training stream seeds its own numpy
    generators from the seed, epoch, rank and reader).
    """
    return DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=persistent and num_workers > 0, generator=torch.Generator(),
    )


def round_robin(quotas: Sequence[int]) -> list[int]:
    """The worker that yields each step when workers with these batch counts are read in turn."""
    return [w for t in range(max(quotas, default=0)) for w, q in enumerate(quotas) if t < q]
