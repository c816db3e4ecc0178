"""Subject-aware training stream: P subjects × K sessions per rank batch, equal batch counts on
every rank, deterministic from (seed, epoch) and resumable mid-epoch.

How a rank's epoch is made (all ranks run the same code on the same manifest):

1. **Placement** (once, from ``seed`` and the manifest alone): the split's shards (or its first
   ones holding ``subjects`` subjects, for a smaller training set) are dealt to
   ``world_size × num_workers`` readers by :func:`assign_shards` (balanced subject counts).
   Shards are disjoint across ranks, hence subjects are: within a global step no subject is on
   two ranks, and every cross-rank pair is a true impostor pair.
2. **Batch count**: reader ``(r, w)`` can fill ``subjects(r, w) // P`` batches; a rank could fill
   the sum over its workers; every rank yields ``batches_per_epoch = min`` over ranks of that,
   so collectives never deadlock. Each rank's workers share its count round-robin
   (:func:`round_robin`), which is also the order the DataLoader yields them in.
3. **Reading**: each reader streams its shards (order reshuffled per epoch) into a buffer of
   ``shuffle_buffer`` subjects; a batch takes P distinct subjects from the buffer at random,
   and K of each subject's sessions without replacement. Only chosen subjects are decoded and featurised.
4. **Short subjects** (fewer than K sessions), ``short_subjects``:
   ``"skip"`` (default) leaves them out; a reader left with too few subjects for its count
   re-reads its shards (a new shuffled pass; subjects already buffered are not added twice),
   so a few subjects appear twice in that epoch. ``"repeat"`` keeps them and tiles a random
   permutation of their sessions up to K (each used ⌊K/S⌋ or ⌈K/S⌉ times); the repeated
   sessions form zero-distance genuine pairs. Subjects with no session are always skipped.

5. **Hard batches** (``hard_batches``, off by default; :mod:`.hard_batches`): the buffer holds
   the reader's every subject; from the step the schedule names, a batch is ``seeds`` random
   subjects of the buffer, each followed by its nearest subjects in the neighbour table that are
   still buffered (not drawn yet this epoch), then random subjects up to P.

All randomness comes from ``numpy.random.default_rng([seed, epoch, rank, worker, …])``, so an
epoch depends on (seed, epoch, world size, workers, config, manifest, neighbour table) and nothing
else. Resuming replays the reader up to the saved step (the same draws, without decoding): the
batches after a resume equal those of an uninterrupted run.

DataLoader workers are kept for the loader's life; each iteration's start (epoch, step, table)
reaches them through shared memory (:class:`~pipeline.data.position.SharedPosition`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from pipeline.config import HardBatchesSection
from pipeline.data.batch import (
    Batch,
    current_worker,
    data_loader,
    distributed_env,
    make_batch,
    round_robin,
)
from pipeline.data.features import DEFAULT_FEATURES, check_features
from pipeline.data.neighbour_table import NeighbourTable, active_neighbours, neighbours_at, pick_hard
from pipeline.data.position import Position, SharedPosition
from pipeline.data.shards import ShardSet, assign_shards
from sharding.format import ShardInfo, decode_subject

SHORT_SUBJECT_RULES = ("skip", "repeat")
STATE_FORMAT = 1


@dataclass(frozen=True)
class SamplerConfig:
    """What a batch is made of. Every field is part of the resume fingerprint."""

    subjects_per_batch: int = 64  # P
    sessions_per_subject: int = 8  # K
    max_len: int = 100
    features: tuple[str, ...] = DEFAULT_FEATURES
    short_subjects: str = "skip"  # see the module docstring
    shuffle_buffer: int = 1024  # subjects held per reader
    seed: int = 0
    subjects: int = 0  # 0: every subject of the split; N: its first shards holding ≥ N (ShardSet.shards)
    hard_batches: HardBatchesSection = field(default_factory=HardBatchesSection)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", check_features(self.features))
        if self.subjects_per_batch < 1 or self.sessions_per_subject < 1:
            raise ValueError("subjects_per_batch and sessions_per_subject must be ≥ 1")
        if self.short_subjects not in SHORT_SUBJECT_RULES:
            raise ValueError(
                f"short_subjects must be one of {SHORT_SUBJECT_RULES}, got {self.short_subjects!r}"
            )
        if self.shuffle_buffer < self.subjects_per_batch:
            raise ValueError("shuffle_buffer must hold at least subjects_per_batch subjects")
        if self.max_len < 1:
            raise ValueError(f"max_len must be ≥ 1, got {self.max_len}")


@dataclass(frozen=True)
class Plan:
    """Shard placement and batch counts; equal on every rank because it uses the manifest only."""

    readers: list[list[list[ShardInfo]]]  # [rank][worker] -> shards
    quotas: list[list[int]]  # [rank][worker] -> batches per epoch
    batches_per_epoch: int

    @classmethod
    def make(
        cls, shards: Sequence[ShardInfo], world_size: int, num_workers: int, subjects_per_batch: int, seed: int
    ) -> "Plan":
        workers = max(num_workers, 1)
        groups = assign_shards(shards, world_size * workers, np.random.default_rng([seed, 0xD15]))
        readers = [groups[r * workers : (r + 1) * workers] for r in range(world_size)]
        capacity = [[sum(s.samples for s in g) // subjects_per_batch for g in rank] for rank in readers]
        batches = min(sum(rank) for rank in capacity)
        if batches == 0:
            raise ValueError(
                f"a reader set of {[sum(s.samples for s in g) for g in groups]} subjects cannot fill one "
                f"batch of {subjects_per_batch} subjects on every rank: lower subjects_per_batch, use "
                "fewer ranks or loader workers, or shard more subjects"
            )
        return cls(readers, [_share(batches, rank) for rank in capacity], batches)

    def order(self, rank: int) -> list[int]:
        """The worker behind each of this rank's steps."""
        return round_robin(self.quotas[rank])


def _share(batches: int, capacity: list[int]) -> list[int]:
    """Split a rank's batch count over its workers, round by round, within each one's capacity."""
    quotas = [0] * len(capacity)
    while sum(quotas) < batches:
        for w, cap in enumerate(capacity):
            if quotas[w] < cap and sum(quotas) < batches:
                quotas[w] += 1
    return quotas


@dataclass
class _Entry:
    """A buffered subject, still encoded: decoding waits until it is drawn into a batch."""

    subject_id: str
    label: int
    sessions: int
    sample: dict[str, Any]


class _Pool:
    """A reader's shuffle buffer, refilled from passes over its shards."""

    def __init__(self, read_pass: Callable[[int], Iterator[_Entry]], capacity: int) -> None:
        self.read_pass, self.capacity = read_pass, capacity
        self.entries: list[_Entry] = []
        self.passes = 0
        self.source = read_pass(0)
        self.added = 0  # subjects added during the current pass

    def refill(self, need: int) -> None:
        held = {e.subject_id for e in self.entries}
        while len(self.entries) < self.capacity:
            entry = next(self.source, None)
            if entry is None:
                if len(self.entries) >= need:
                    return
                if self.passes > 0 and self.added == 0:
                    raise ValueError(
                        f"a reader's shards hold only {len(self.entries)} eligible subjects, fewer than "
                        f"{need} per batch: lower sessions_per_subject or use short_subjects='repeat'"
                    )
                self.passes += 1
                self.source, self.added = self.read_pass(self.passes), 0
            elif entry.subject_id not in held:
                self.entries.append(entry)
                held.add(entry.subject_id)
                self.added += 1

    def take(self, indices: np.ndarray) -> list[_Entry]:
        chosen = [self.entries[i] for i in indices]
        drop = set(int(i) for i in indices)
        self.entries = [e for i, e in enumerate(self.entries) if i not in drop]
        return chosen


class SubjectBatchDataset(IterableDataset):
    """This rank's batches from the :class:`Position` in ``position``; use it via :class:`SubjectBatchLoader`."""

    def __init__(
        self, shard_set: ShardSet, split: str, config: SamplerConfig,
        rank: int, world_size: int, num_workers: int,
    ) -> None:
        self.shard_set, self.split, self.config = shard_set, split, config
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.subject_ids = shard_set.subjects(split, config.subjects)
        self.labels = {s: i for i, s in enumerate(self.subject_ids)}
        self.plan = Plan.make(
            shard_set.shards(split, config.subjects), world_size, num_workers, config.subjects_per_batch, config.seed
        )
        hard = config.hard_batches
        self.position = SharedPosition(len(self.subject_ids), hard.passed_over + hard.cap if hard.enabled else 0)

    def __iter__(self) -> Iterator[Batch]:
        # The DataLoader always asks worker 0 first; after a resume the next step may belong to
        # another reader, so worker slots are rotated to start the round-robin at that reader.
        position = self.position.read()
        order = self.plan.order(self.rank)
        workers = max(self.num_workers, 1)
        first = order[position.step] if position.step < len(order) else 0
        reader = (current_worker(self.num_workers) + first) % workers
        return self._batches(position, reader, order[: position.step].count(reader))

    def _batches(self, position: Position, worker: int, skip: int) -> Iterator[Batch]:
        cfg, epoch = self.config, position.epoch
        rng = np.random.default_rng([cfg.seed, epoch, self.rank, worker])
        pool = _Pool(lambda p: self._entries(epoch, worker, p), self._buffer_size(worker))
        rank_steps = [i for i, w in enumerate(self.plan.order(self.rank)) if w == worker]
        for step in range(self.plan.quotas[self.rank][worker]):
            pool.refill(cfg.subjects_per_batch)
            chosen = pool.take(self._choose(pool, rng, position, rank_steps[step]))
            picks = [self._sessions(e.sessions, rng) for e in chosen]
            if step >= skip:
                yield self._build(chosen, picks)

    def _buffer_size(self, worker: int) -> int:
        """``shuffle_buffer`` bounds a reader's memory; hard batches buffer the reader's every
        subject instead, so that a seed's neighbours are at hand until they are drawn."""
        if not self.config.hard_batches.enabled:
            return self.config.shuffle_buffer
        return max(self.config.shuffle_buffer, sum(s.samples for s in self.plan.readers[self.rank][worker]))

    def _choose(self, pool: _Pool, rng: np.random.Generator, position: Position, rank_step: int) -> np.ndarray:
        """Buffer indices of the P subjects of this rank's step ``rank_step``: at random, or a
        hard batch once the schedule gives neighbours and a table is in force."""
        cfg, hard, table = self.config, self.config.hard_batches, position.neighbours
        count = neighbours_at(hard, position.epoch * self.plan.batches_per_epoch + rank_step)
        if count == 0 or table is None:
            return rng.choice(len(pool.entries), cfg.subjects_per_batch, replace=False)
        labels, neighbours = [entry.label for entry in pool.entries], active_neighbours(table, hard, count)
        return pick_hard(labels, cfg.subjects_per_batch, hard.seeds, rng, neighbours)

    def _sessions(self, available: int, rng: np.random.Generator) -> np.ndarray:
        k = self.config.sessions_per_subject
        if available >= k:
            return rng.choice(available, k, replace=False)
        return np.resize(rng.permutation(available), k)  # short_subjects == "repeat"

    def _entries(self, epoch: int, worker: int, pass_index: int) -> Iterator[_Entry]:
        """One pass over a reader's shards, in an order drawn for (seed, epoch, pass)."""
        shards = list(self.plan.readers[self.rank][worker])
        rng = np.random.default_rng([self.config.seed, epoch, self.rank, worker, pass_index, 0x5A])
        k, repeat = self.config.sessions_per_subject, self.config.short_subjects == "repeat"
        for i in rng.permutation(len(shards)):
            for label, subject_id, sample in self.shard_set.labelled_samples(shards[i], self.labels):
                sessions = len(json.loads(sample["sessions.json"]))
                if sessions >= k or (repeat and sessions > 0):
                    yield _Entry(subject_id, label, sessions, sample)

    def _build(self, chosen: list[_Entry], picks: list[np.ndarray]) -> Batch:
        sessions, labels, subjects, session_ids = [], [], [], []
        for entry, pick in zip(chosen, picks):
            subject = decode_subject(entry.sample)
            for j in pick:
                sessions.append(subject.sessions[j])
                session_ids.append(subject.session_ids[j])
            labels += [entry.label] * len(pick)
            subjects += [entry.subject_id] * len(pick)
        cfg = self.config
        return make_batch(sessions, labels, subjects, session_ids, cfg.features, cfg.max_len)


class SubjectBatchLoader:
    """Iterable over this rank's training batches for the current epoch, from the saved step on.

    ``for batch in loader`` runs one epoch (``batches_per_epoch`` batches on every rank) and then
    advances to the next epoch. ``state_dict()`` is ``{"format": 1, "epoch": e, "step": s,
    "fingerprint": {...}}`` — ``s`` batches of epoch ``e`` were handed out (an epoch that was
    finished reads as ``(e + 1, 0)``); the fingerprint (config, split, world size, workers,
    manifest digest) must match on load. With hard batches on it also holds ``"neighbours"``, the
    neighbour table in force (merged over ranks). It is the same on every rank: save it from
    rank 0, load it everywhere. A resume replays the reader's draws up to ``s`` (reading the
    shards again, without decoding), so its cost grows with the position in the epoch.

    The ``num_workers`` DataLoader workers start at the first iteration and are kept until the
    loader is dropped: every epoch, and a ``load_state_dict`` on this loader, reuses them.
    ``pin_memory=True`` pins each batch for an asynchronous copy to a GPU
    (``Batch.to(device, non_blocking=True)``); pass ``pin_memory=device.type == "cuda"``.
    """

    def __init__(
        self,
        url: str,
        split: str = "train",
        config: SamplerConfig | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.config = config or SamplerConfig()
        self.rank, self.world_size = distributed_env(rank, world_size)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.shard_set = ShardSet(url, storage_options)
        self.dataset = SubjectBatchDataset(
            self.shard_set, split, self.config, self.rank, self.world_size, num_workers
        )
        self.data_loader = data_loader(self.dataset, num_workers, pin_memory, persistent=True)
        self.epoch = 0
        self.step = 0
        self.neighbours: NeighbourTable | None = None  # hard batches' table; set before an epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.plan.batches_per_epoch

    @property
    def num_classes(self) -> int:
        """Subjects in the split: the label range, and the class count of classification losses."""
        return len(self.dataset.subject_ids)

    @property
    def subject_ids(self) -> list[str]:
        """``subject_ids[label]`` is the subject a global label stands for."""
        return self.dataset.subject_ids

    @property
    def readers(self) -> list[list[ShardInfo]]:
        """This rank's shards per reader: a hard batch's subjects all come from one reader."""
        return self.dataset.plan.readers[self.rank]

    @property
    def num_features(self) -> int:
        return len(self.config.features)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.position.write(Position(self.epoch, self.step, self.neighbours))
        for batch in self.data_loader:
            self.step += 1
            yield batch
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch at the next iteration."""
        self.epoch, self.step = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        epoch, step = (self.epoch + 1, 0) if self.step >= self.batches_per_epoch else (self.epoch, self.step)
        state = {"format": STATE_FORMAT, "epoch": epoch, "step": step, "fingerprint": self._fingerprint()}
        if self.neighbours is not None:
            state["neighbours"] = self.neighbours.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported loader state format {state.get('format')!r}")
        saved, current = state["fingerprint"], self._fingerprint()
        changed = sorted(k for k in current.keys() | saved.keys() if saved.get(k) != current.get(k))
        if changed:
            raise ValueError(
                f"cannot resume this stream exactly: {', '.join(changed)} changed since the state "
                f"was saved (saved {({k: saved.get(k) for k in changed})}, now "
                f"{({k: current.get(k) for k in changed})})"
            )
        if not 0 <= state["step"] < self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(f"step {state['step']} is outside an epoch of {self.batches_per_epoch} batches")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.neighbours = NeighbourTable.from_state(state["neighbours"]) if "neighbours" in state else None

    def _fingerprint(self) -> dict[str, Any]:
        settings = asdict(self.config)
        if not self.config.hard_batches.enabled:  # states saved before the setting existed still load
            del settings["hard_batches"]
        return {
            **settings,
            "features": list(self.config.features),
            "split": self.dataset.split,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "manifest_sha256": hashlib.sha256(self.shard_set.manifest.to_json().encode()).hexdigest(),
        }
