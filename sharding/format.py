"""The contract between sharding and pipeline: one WebDataset sample per subject, and the manifest.

Sample layout (all arrays are ``.npy`` written with ``allow_pickle=False``):

==================  ======================================================================
``__key__``         the subject id made tar-safe (``/`` and ``.`` replaced by ``_``)
``subject.txt``     the original subject id, UTF-8
``sessions.json``   the session ids, in the order of the arrays below
``lengths.npy``     ``int32 [S]`` keys per session
``start.npy``       ``int64 [S]`` first press time of each session (ms); ``float64`` if any
                    source time is not an integer
``keys.npy``        ``[sum(lengths), 3]``: ``press - start``, ``release - start``, keycode;
                    ``int32`` when every value is an integer that fits, else ``float64``
==================  ======================================================================

Decoding returns each session as the original ``[n_keys, 3]`` array of
``[press_ms, release_ms, keycode]`` as ``float64``; for integral sources (all known
keystroke corpora) the values are exactly the input ones — the shards are lossless.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")

# Raw columns stored in every shard, and the default features the loader derives from them.
FEATURE_SPEC: dict[str, Any] = {
    "raw_columns": ["press_ms", "release_ms", "keycode"],
    "default_features": ["keycode", "hold", "flight"],
    "optional_features": ["inter_release", "release_press"],
    "max_len": 100,
}


class ShardIntegrityError(RuntimeError):
    """A shard's content does not match what the manifest recorded for it."""


@dataclass
class Subject:
    """One subject and all their sessions, as read back from a shard."""

    subject_id: str
    session_ids: list[str]
    sessions: list[np.ndarray]  # each float64 [n_keys, 3]: press_ms, release_ms, keycode


def sample_key(subject_id: str) -> str:
    """A tar-safe WebDataset key (WebDataset splits extensions at the first dot)."""
    return subject_id.replace("/", "_").replace(".", "_")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _is_integral(array: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(array)) and np.all(array == np.round(array)))


def encode_subject(subject_id: str, sessions: dict[str, np.ndarray]) -> dict[str, Any]:
    """WebDataset sample for one subject; ``sessions`` maps session id → ``[n_keys, 3]``."""
    session_ids = list(sessions)
    arrays = [np.asarray(sessions[s], dtype=np.float64).reshape(-1, 3) for s in session_ids]
    starts = np.array([a[:, 0].min() if len(a) else 0.0 for a in arrays])
    relative = np.concatenate([a - np.array([s, s, 0.0]) for a, s in zip(arrays, starts)])
    integral = _is_integral(starts) and _is_integral(relative)
    fits = integral and (relative.size == 0 or np.abs(relative).max() < 2**31)
    return {
        "__key__": sample_key(subject_id),
        "subject.txt": subject_id.encode("utf-8"),
        "sessions.json": json.dumps(session_ids).encode("utf-8"),
        "lengths.npy": _npy(np.array([len(a) for a in arrays], dtype=np.int32)),
        "start.npy": _npy(starts.astype(np.int64 if integral else np.float64)),
        "keys.npy": _npy(relative.astype(np.int32 if fits else np.float64)),
    }


def decode_subject(sample: dict[str, Any]) -> Subject:
    """Inverse of :func:`encode_subject`; accepts raw bytes as read from the tar."""
    lengths = _load_npy(sample["lengths.npy"])
    starts = _load_npy(sample["start.npy"])
    keys = _load_npy(sample["keys.npy"])
    session_ids = json.loads(sample["sessions.json"])
    subject_id = sample["subject.txt"].decode("utf-8")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    sessions = []
    for i, start in enumerate(starts):
        block = keys[bounds[i] : bounds[i + 1]]
        if block.dtype.kind in "iu" and starts.dtype.kind in "iu":
            exact = block.astype(np.int64)
            exact[:, :2] += np.int64(start)
            sessions.append(exact.astype(np.float64))
        else:
            sessions.append(block.astype(np.float64) + np.array([start, start, 0.0]))
    return Subject(subject_id, session_ids, sessions)


@dataclass
class ShardInfo:
    """One committed shard file, as recorded in the manifest."""

    name: str  # file name relative to the manifest's folder, e.g. "train-000000.tar"
    split: str
    samples: int  # subjects
    sessions: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """The commit point of a shard set; the pipeline reads shards only through it."""

    source: dict[str, Any]
    seed: int
    shards: list[ShardInfo]
    subjects: dict[str, str]  # subject id -> shard name
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    feature_spec: dict[str, Any] = field(default_factory=lambda: dict(FEATURE_SPEC))
    schema_version: int = SCHEMA_VERSION

    def shards_of(self, split: str) -> list[ShardInfo]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"manifest schema version {version} is not supported (expected {SCHEMA_VERSION})"
            )
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
        return cls(**data)


def load_manifest(url: str, **storage_options: Any) -> Manifest:
    """Read the manifest of the shard set at ``url`` (folder, ``file://`` or ``s3://``)."""
    from sharding.storage import StorageError, open_fs

    fs, root = open_fs(url, **storage_options)
    path = f"{root}/{MANIFEST_NAME}"
    try:
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} at {url!r}: not a shard set, or sharding has not finished"
        ) from error
    except Exception as error:  # noqa: BLE001
        raise StorageError(f"cannot read {path!r}: {error}") from error
    return Manifest.from_json(text)
