"""Hard batches on the worker (``data.hard_batches``, docs/design.md §8): the neighbour table
recomputed with the current model, and how hard the batches are.

At an epoch's start (every ``every_epochs``, once the schedule gives neighbours) each rank embeds
``sessions_per_centroid`` sessions of each of its own subjects — subjects are disjoint across
ranks, so the ranks share the work — and averages them into centroids. The sessions are drawn
once per run and kept featurised: reading and decoding the shards again would cost more than
embedding them. A subject's nearest
subjects are searched among its own reader's subjects only, since a batch is built from one
reader's shards. Only the neighbour lists cross ranks (all-gathered, never the centroids), so
every rank's loader holds the same merged table and a checkpoint, saved from rank 0, restores it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainConfig
from pipeline.data import Batch, SubjectBatchLoader
from pipeline.data.batch import Row, batch_of_rows
from pipeline.data.neighbour_table import NeighbourTable, active_neighbours, neighbour_share, neighbours_at
from pipeline.distributed import use_rank0_buffers
from pipeline.evaluation.embedding import embed
from pipeline.training.clock import clock
from sharding.format import ShardInfo, decode_subject

ROW_CHUNK = 1024  # centroid rows per distance block: a large reader never holds all its distances


class HardBatches:
    """Keeps the loader's neighbour table current and measures the batches it gives.

    The model's output is kept by a forward hook (detached), so the batch statistics cost no
    second forward pass.
    """

    def __init__(self, config: TrainConfig, loader: SubjectBatchLoader, model: nn.Module) -> None:
        self.settings, self.loader, self.model = config.data.hard_batches, loader, model
        self.features, self.max_len = config.data.features, config.data.max_len
        self.batch_size, self.precision = config.data.eval_batch_size, config.train.precision
        self.centroid_seconds = 0.0
        self.embeddings: torch.Tensor | None = None
        self.session_batches: dict[int, list[Batch]] = {}  # per reader, read at the first refresh
        model.register_forward_hook(self._keep_output)

    def refresh(self) -> None:
        """Recompute the table with the current model at an epoch's start, when it is due."""
        if not self._due():
            return
        use_rank0_buffers(self.model)  # every rank embeds with the model a checkpoint restores
        device = next(self.model.parameters()).device  # once an epoch: always worth waiting for
        start = clock(device)
        nearest: dict[int, list[int]] = {}
        depth = self.settings.passed_over + self.settings.cap
        for reader, shards in enumerate(self.loader.readers):
            labels, centroids = self._centroids(shards, reader)
            nearest.update(nearest_subjects(labels, centroids, depth))
        self.loader.neighbours = NeighbourTable(self.loader.epoch, merged_over_ranks(nearest))
        self.centroid_seconds = clock(device) - start

    def metrics(self, batch: Batch) -> dict[str, float]:
        """``train/impostor_distance`` (mean cosine-geometry distance between this rank's
        embeddings of different subjects: how close the batch's impostors are) and, with hard
        batches on, ``train/neighbour_share`` and ``time/centroids_s`` (the last refresh)."""
        metrics = {"train/impostor_distance": impostor_distance(self.embeddings, batch.labels)}
        table = self.loader.neighbours
        if table is not None:
            step = self.loader.epoch * self.loader.batches_per_epoch + self.loader.step - 1
            neighbours = active_neighbours(table, self.settings, neighbours_at(self.settings, step))
            subjects = batch.labels[:: self.loader.config.sessions_per_subject].tolist()
            metrics.update({"train/neighbour_share": neighbour_share(subjects, neighbours),
                            "time/centroids_s": self.centroid_seconds})
        return metrics

    def _due(self) -> bool:
        """At an epoch's first step only: a batch must depend on (seed, epoch, table) alone for
        a resume to replay it, which a table changed mid-epoch would break."""
        loader = self.loader
        last_step = (loader.epoch + 1) * loader.batches_per_epoch - 1
        if loader.step > 0 or neighbours_at(self.settings, last_step) == 0:
            return False
        table = loader.neighbours
        return table is None or loader.epoch - table.epoch >= self.settings.every_epochs

    def _centroids(self, shards: list[ShardInfo], reader: int) -> tuple[np.ndarray, torch.Tensor]:
        """(labels, unit-length mean embeddings) of a reader's subjects. Unit length because the
        losses normalise embeddings (EERLoss by default) and evaluation scores cosine."""
        if reader not in self.session_batches:
            self.session_batches[reader] = list(self._session_batches(shards, reader))
        embeddings, labels, _ = embed(self.model, self.session_batches[reader], precision=self.precision)
        subjects, rows = np.unique(labels, return_inverse=True)
        sums = torch.zeros(len(subjects), embeddings.shape[1]).index_add_(
            0, torch.from_numpy(rows), F.normalize(embeddings, dim=1)
        )
        return subjects, F.normalize(sums, dim=1)

    def _session_batches(self, shards: list[ShardInfo], reader: int) -> Iterator[Batch]:
        """A few sessions of every subject of ``shards``, drawn for (seed, rank, reader): the
        same in a resumed run, whichever epoch it resumes at."""
        loader = self.loader
        rng = np.random.default_rng([loader.config.seed, loader.rank, reader, 0xCE])
        labels = {subject: i for i, subject in enumerate(loader.subject_ids)}
        rows: list[Row] = []
        for shard in shards:
            for label, subject_id, sample in loader.shard_set.labelled_samples(shard, labels):
                subject = decode_subject(sample)
                count = min(self.settings.sessions_per_centroid, len(subject.sessions))
                for j in rng.choice(len(subject.sessions), count, replace=False):
                    rows.append((subject.sessions[j], label, subject_id, subject.session_ids[j]))
                if len(rows) >= self.batch_size:
                    yield batch_of_rows(rows, self.features, self.max_len)
                    rows = []
        if rows:
            yield batch_of_rows(rows, self.features, self.max_len)

    def _keep_output(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.embeddings = output.detach()


def nearest_subjects(labels: np.ndarray, centroids: torch.Tensor, depth: int) -> dict[int, list[int]]:
    """Each subject's ``depth`` nearest other subjects by centroid distance, nearest first."""
    depth = min(depth, len(labels) - 1)
    nearest: dict[int, list[int]] = {}
    for start in range(0, len(labels), ROW_CHUNK):
        distances = torch.cdist(centroids[start : start + ROW_CHUNK], centroids)
        rows = torch.arange(len(distances))
        distances[rows, rows + start] = math.inf  # a subject is not its own neighbour
        order = distances.topk(depth, largest=False).indices.numpy()
        nearest.update({int(labels[start + i]): labels[row].tolist() for i, row in enumerate(order)})
    return nearest


def merged_over_ranks(nearest: dict[int, list[int]]) -> dict[int, list[int]]:
    """Every rank's lists in one table (labels are disjoint across ranks), so that every rank's
    loader state is the same and rank 0's checkpoint restores all of them."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return nearest
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, nearest)
    return {label: lists for part in parts for label, lists in part.items()}


def impostor_distance(embeddings: torch.Tensor | None, labels: torch.Tensor) -> float:
    """Mean distance between unit-length embeddings of different subjects."""
    if embeddings is None:
        return math.nan
    unit = F.normalize(embeddings.float(), dim=1)
    impostor = labels[:, None].to(unit.device) != labels[None, :].to(unit.device)
    return float(torch.cdist(unit, unit)[impostor].mean())
