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
import re
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
    def from_json(cls, text: str | bytes, origin: str = MANIFEST_NAME) -> "Manifest":
        """Parse and check a manifest; any problem is a :class:`ManifestError` naming ``origin``.

        The shard names are checked to be plain file names: the pipeline joins them to the
        set's folder, and ``../x.tar`` would read (or a re-run write) outside it. Unknown
        top-level keys are ignored, so that later additive fields do not break older readers.
        """
        data = _parse_json(text, origin)
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ManifestError(f"{origin}: schema version {version!r} is not supported "
                                f"(expected {SCHEMA_VERSION})")
        missing = [key for key in _REQUIRED if key not in data]
        if missing:
            raise ManifestError(f"{origin}: lacks {', '.join(map(repr, missing))}")
        for key, kind in _MANIFEST_FIELDS.items():
            if key in data and not _is(data[key], kind):
                raise ManifestError(f"{origin}: {key!r} must be a JSON {_JSON_NAMES[kind]}")
        shards = [_shard_info(entry, i, origin) for i, entry in enumerate(data["shards"])]
        _check_names(shards, data["subjects"], origin)
        fields = {key: data[key] for key in _MANIFEST_FIELDS if key in data}
        return cls(**{**fields, "shards": shards})


class ManifestError(ValueError):
    """A manifest that is not valid JSON or not shaped like one; the message names the file."""


_REQUIRED = ("schema_version", "source", "seed", "shards", "subjects")
_MANIFEST_FIELDS: dict[str, type] = {"source": dict, "seed": int, "shards": list, "subjects": dict,
                                     "rejected": dict, "feature_spec": dict, "schema_version": int}
_SHARD_FIELDS: dict[str, type] = {"name": str, "split": str, "samples": int, "sessions": int,
                                  "bytes": int, "sha256": str}
_JSON_NAMES = {dict: "object", list: "array", int: "integer", str: "string"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is(value: Any, kind: type) -> bool:
    """JSON type check; ``true`` is not an integer here although Python's bool is an int."""
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _parse_json(text: str | bytes, origin: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except UnicodeDecodeError as error:
        raise ManifestError(f"{origin}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise ManifestError(f"{origin}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ManifestError(f"{origin}: expected a JSON object, found a JSON "
                            f"{_JSON_NAMES.get(type(data), type(data).__name__)}")
    return data


def is_plain_name(name: str) -> bool:
    """Whether ``name`` is one file name, not a path: no separator, not ``.``/``..``, no NUL."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _shard_info(entry: Any, index: int, origin: str) -> ShardInfo:
    where = f"{origin}: shard {index}"
    if not isinstance(entry, dict):
        raise ManifestError(f"{where} is not a JSON object")
    for key, kind in _SHARD_FIELDS.items():
        if not _is(entry.get(key), kind):
            raise ManifestError(f"{where}: {key!r} must be a JSON {_JSON_NAMES[kind]}")
    info = ShardInfo(**{key: entry[key] for key in _SHARD_FIELDS})
    if not is_plain_name(info.name):
        raise ManifestError(f"{where}: name {info.name!r} is not a plain file name "
                            "(shards must sit in the manifest's folder)")
    if info.split not in SPLITS:
        raise ManifestError(f"{where} ({info.name}): unknown split {info.split!r}")
    if min(info.samples, info.sessions, info.bytes) < 0 or not _SHA256.fullmatch(info.sha256):
        raise ManifestError(f"{where} ({info.name}): negative count or malformed sha256")
    return info


def _check_names(shards: list[ShardInfo], subjects: dict[str, Any], origin: str) -> None:
    names = [info.name for info in shards]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ManifestError(f"{origin}: shard {repeated[0]!r} is listed twice")
    listed = set(names)
    for subject, name in subjects.items():
        if name not in listed:
            raise ManifestError(f"{origin}: subject {subject!r} maps to {name!r}, "
                                "which is not a listed shard")


def manifest_location(url: str) -> str:
    """Where a set's manifest is, as a user would write it (for messages)."""
    return f"{url.rstrip('/')}/{MANIFEST_NAME}"


def load_manifest(url: str, **storage_options: Any) -> Manifest:
    """Read and check the manifest of the shard set at ``url`` (folder, ``file://`` or ``s3://``).

    Raises ``FileNotFoundError`` if there is none, :class:`ManifestError` if it is malformed.
    """
    from sharding.storage import StorageError, open_fs

    fs, root = open_fs(url, **storage_options)
    path = f"{root}/{MANIFEST_NAME}"
    try:
        data = fs.cat_file(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} at {url!r}: not a shard set, or sharding has not finished"
        ) from error
    except Exception as error:  # noqa: BLE001
        raise StorageError(f"cannot read {path!r}: {error}") from error
    return Manifest.from_json(data, manifest_location(url))
