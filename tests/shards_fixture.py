"""Small shard sets written through the format contract (``sharding.format``), for loader tests.

Subjects get random 8-character ids (as in KVC), so sorted order differs from write order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import webdataset as wds

from sharding.format import MANIFEST_NAME, Manifest, ShardInfo, encode_subject

Corpus = dict[str, dict[str, np.ndarray]]  # subject id -> session id -> [n_keys, 3]


def random_session(rng: np.random.Generator, keys: int) -> np.ndarray:
    """Integer ms times in the Unix epoch range, release ≥ press, JavaScript-like keycodes."""
    press = 1_470_000_000_000 + np.cumsum(rng.integers(40, 400, keys))
    release = press + rng.integers(30, 200, keys)
    return np.stack([press, release, rng.integers(8, 222, keys)], axis=1).astype(np.float64)


def write_shard_set(
    root: str | Path,
    layout: Mapping[str, Sequence[int]],
    sessions: Callable[[int], int] = lambda i: 15,
    keys: tuple[int, int] = (20, 70),
    seed: int = 0,
) -> tuple[Manifest, Corpus]:
    """Write ``layout`` (split → subjects per shard) under ``root``; return the manifest and data.

    ``sessions(i)`` gives the session count of the i-th subject written (over all splits).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    corpus: Corpus = {}
    shards: list[ShardInfo] = []
    subjects: dict[str, str] = {}
    for split, sizes in layout.items():
        for number, size in enumerate(sizes):
            name = f"{split}-{number:06d}.tar"
            with wds.TarWriter(str(root / name)) as writer:
                for _ in range(size):
                    subject = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz0123456789"), 8))
                    corpus[subject] = {
                        f"{subject}_s{j:02d}": random_session(rng, int(rng.integers(*keys)))
                        for j in range(sessions(len(corpus)))
                    }
                    writer.write(encode_subject(subject, corpus[subject]))
                    subjects[subject] = name
            data = (root / name).read_bytes()
            count = sum(len(corpus[s]) for s, shard in subjects.items() if shard == name)
            shards.append(ShardInfo(name, split, size, count, len(data), hashlib.sha256(data).hexdigest()))
    manifest = Manifest(source={"kind": "test"}, seed=seed, shards=shards, subjects=subjects)
    (root / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest, corpus
