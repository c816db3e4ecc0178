"""Check a committed shard set against its manifest, and summarise it."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander

from sharding.format import SPLITS, Subject, decode_subject, load_manifest
from sharding.storage import check_readable
from sharding.writer import rerun_command


def iter_samples(data: bytes, name: str = "shard") -> Iterator[dict[str, Any]]:
    """The raw WebDataset samples of one tar held in memory, as the loader would group them."""
    streams = [{"url": name, "stream": io.BytesIO(data)}]
    yield from group_by_keys(tar_file_expander(streams))


def read_shard(url: str, name: str, **storage_options: Any) -> list[Subject]:
    """Every subject of one shard of the set at ``url`` (for tests and inspection)."""
    fs, root = check_readable(url, **storage_options)
    return [decode_subject(s) for s in iter_samples(fs.cat_file(f"{root}/{name}"), name)]


@dataclass
class VerifyReport:
    shards: int = 0
    subjects: int = 0
    sessions: int = 0
    problems: list[str] = field(default_factory=list)
    repair: str | None = None  # with problems: the command that rewrites the bad shards

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shards(url: str, **storage_options: Any) -> VerifyReport:
    """Every shard exists, matches its size and sha256, decodes, and holds what the manifest says.

    Also checks that each subject sits in exactly the shard the manifest maps it to (hence in
    one split only).
    """
    fs, root = check_readable(url, **storage_options)  # first: an unreachable store fails fast
    manifest = load_manifest(url, **storage_options)
    report = VerifyReport(shards=len(manifest.shards))
    found: dict[str, str] = {}
    for info in manifest.shards:
        try:
            data = fs.cat_file(f"{root}/{info.name}")
        except FileNotFoundError:
            report.problems.append(f"{info.name}: missing")
            continue
        if len(data) != info.bytes:
            report.problems.append(f"{info.name}: {len(data)} bytes, manifest says {info.bytes}")
        if hashlib.sha256(data).hexdigest() != info.sha256:
            report.problems.append(f"{info.name}: sha256 differs from the manifest")
        samples = sessions = 0
        try:
            for sample in iter_samples(data, info.name):
                subject = decode_subject(sample)
                samples += 1
                sessions += len(subject.sessions)
                if subject.subject_id in found:
                    report.problems.append(f"{info.name}: subject {subject.subject_id!r} "
                                           f"also in {found[subject.subject_id]}")
                found[subject.subject_id] = info.name
                if manifest.subjects.get(subject.subject_id) != info.name:
                    report.problems.append(f"{info.name}: subject {subject.subject_id!r} is "
                                           "not mapped to this shard by the manifest")
        except Exception as error:  # noqa: BLE001 - any decoding failure is a finding
            report.problems.append(f"{info.name}: does not decode ({type(error).__name__}: {error})")
            continue
        if (samples, sessions) != (info.samples, info.sessions):
            report.problems.append(f"{info.name}: {samples} subjects / {sessions} sessions, "
                                   f"manifest says {info.samples} / {info.sessions}")
        report.subjects += samples
        report.sessions += sessions
    missing = set(manifest.subjects) - set(found)
    if missing:
        report.problems.append(f"{len(missing)} subjects of the manifest are in no shard, "
                               f"e.g. {sorted(missing)[0]!r}")
    if report.problems:
        report.repair = rerun_command(manifest, url)
    return report


def shard_stats(url: str, **storage_options: Any) -> dict[str, Any]:
    """Subjects, sessions and keys per split, shard size distribution and rejected counts."""
    fs, root = check_readable(url, **storage_options)
    manifest = load_manifest(url, **storage_options)
    splits = {split: {"shards": 0, "subjects": 0, "sessions": 0, "keys": 0} for split in SPLITS}
    for info in manifest.shards:
        row = splits[info.split]
        row["shards"] += 1
        row["subjects"] += info.samples
        row["sessions"] += info.sessions
        for sample in iter_samples(fs.cat_file(f"{root}/{info.name}"), info.name):
            row["keys"] += int(np.load(io.BytesIO(sample["lengths.npy"])).sum())
    sizes = np.array([info.bytes for info in manifest.shards] or [0])
    return {
        "splits": splits,
        "shard_bytes": {"count": len(manifest.shards), "total": int(sizes.sum()),
                        "min": int(sizes.min()), "median": float(np.median(sizes)),
                        "max": int(sizes.max())},
        "rejected": manifest.rejected,
        "source": manifest.source,
    }
