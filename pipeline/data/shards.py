"""Reading a shard set through its manifest: subject labels, shard placement, verified streaming.

WebDataset 1.0.2 opens URLs with ``gopen``, which has no ``s3://`` handler; here every shard is
read with fsspec (any URL ``sharding.storage.open_fs`` accepts) and handed to WebDataset's own
tar expander and key grouper, so local folders and object storage take the same path. Each
shard is checked against the manifest (bytes, SHA-256 of the file, subject count): a truncated
or replaced shard is an error, never a silently different epoch.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander

from sharding.format import Manifest, ShardInfo, ShardIntegrityError, load_manifest
from sharding.storage import open_fs


class ShardSet:
    """An opened shard set: where it lives and its manifest (the only index the pipeline uses).

    The filesystem is opened per process: s3fs instances are not fork-safe, and DataLoader
    workers are forked with this object inside them.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url, self.storage_options = url, dict(storage_options or {})
        self.manifest: Manifest = load_manifest(url, **self.storage_options)
        self._fs, self.root = open_fs(url, **self.storage_options)
        self._pid = os.getpid()

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._pid != os.getpid():
            self._fs, _ = open_fs(self.url, **self.storage_options)
            self._pid = os.getpid()
        return self._fs

    def shards(self, split: str, subjects: int = 0) -> list[ShardInfo]:
        """The split's shards, or its first ones holding ``subjects`` subjects (:func:`first_subjects`)."""
        shards = self.manifest.shards_of(split)
        if not shards:
            raise ValueError(f"the manifest lists no {split!r} shards")
        return first_subjects(shards, subjects)

    def subjects(self, split: str, subjects: int = 0) -> list[str]:
        """The ids of the subjects in ``shards(split, subjects)``, sorted: a subject's index here is
        its global integer label."""
        names = {s.name for s in self.shards(split, subjects)}
        return sorted(subject for subject, shard in self.manifest.subjects.items() if shard in names)

    def samples(self, shard: ShardInfo) -> Iterator[dict[str, Any]]:
        """Raw WebDataset samples of one shard, in file order, after checking it against the manifest."""
        source = {"url": shard.name, "stream": io.BytesIO(self.read(shard))}
        count = 0
        for sample in group_by_keys(tar_file_expander([source])):
            count += 1
            yield sample
        if count != shard.samples:
            raise ShardIntegrityError(
                f"shard {shard.name!r} holds {count} subjects, the manifest says {shard.samples}"
            )

    def labelled_samples(
        self, shard: ShardInfo, labels: Mapping[str, int]
    ) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """``(label, subject id, raw sample)`` per subject; ``labels`` maps the split's subjects."""
        for sample in self.samples(shard):
            subject_id = sample["subject.txt"].decode("utf-8")
            if subject_id not in labels:
                raise ShardIntegrityError(
                    f"subject {subject_id!r} in shard {shard.name!r} is not a {shard.split!r} "
                    "subject of the manifest"
                )
            yield labels[subject_id], subject_id, sample

    def read(self, shard: ShardInfo) -> bytes:
        """A whole shard, verified (size, SHA-256) before any of it reaches a batch.

        Shards are read whole rather than streamed so that a truncated or replaced one fails
        before its first subject is used, not after; a shard is a few MB of keystrokes.
        """
        path = f"{self.root}/{shard.name}"
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError as error:
            raise ShardIntegrityError(
                f"shard {shard.name!r} listed in the manifest is missing ({path})"
            ) from error
        if len(data) != shard.bytes:
            problem = f"{len(data)} bytes, the manifest says {shard.bytes}"
        elif hashlib.sha256(data).hexdigest() != shard.sha256:
            problem = "its SHA-256 differs from the manifest's"
        else:
            return data
        raise ShardIntegrityError(
            f"shard {shard.name!r} does not match the manifest ({problem}): it was modified or "
            "truncated after sharding; re-run the eerpipe shard command that wrote the set (it rewrites the bad shards)"
        )


def first_subjects(shards: Sequence[ShardInfo], subjects: int) -> list[ShardInfo]:
    """The shortest run of ``shards`` from the first that holds at least ``subjects`` subjects
    (0: all of them). Sharding places subjects at random, so the first shards are a random subset,
    and a larger count only adds shards: nested training sets for a study of subjects scaling."""
    if subjects <= 0:
        return list(shards)
    total = 0
    for count, shard in enumerate(shards, start=1):
        total += shard.samples
        if total >= subjects:
            return list(shards[:count])
    raise ValueError(f"data.train_subjects={subjects}, but the training split holds {total} subjects")


def assign_shards(
    shards: Sequence[ShardInfo],
    parts: int,
    rng: np.random.Generator,
    size: Callable[[ShardInfo], int] = lambda shard: shard.samples,
    allow_empty: bool = False,
) -> list[list[ShardInfo]]:
    """Split shards into ``parts`` disjoint groups with ``size`` totals as equal as possible.

    Largest shards first, each to the currently smallest group (LPT); the random order breaks
    ties between equal-sized shards. Disjoint shards mean disjoint subjects: the sampler's
    cross-rank guarantee.
    """
    if len(shards) < parts and not allow_empty:
        raise ValueError(
            f"{len(shards)} shards cannot feed {parts} readers (ranks × loader workers): "
            "re-shard with smaller shards (--subjects-per-shard) or use fewer ranks/workers"
        )
    order = rng.permutation(len(shards))
    ranked = sorted(order, key=lambda i: -size(shards[i]))  # stable: ties keep the random order
    groups: list[list[ShardInfo]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for i in ranked:
        target = min(range(parts), key=lambda g: (totals[g], g))
        groups[target].append(shards[i])
        totals[target] += size(shards[i])
    return groups
