"""Shard a :class:`~sharding.sources.Source` into WebDataset tars plus a manifest.

Layout under the output URL (a folder, ``file://`` or ``s3://bucket/prefix``)::

    train-000000.tar ... val-000000.tar ... test-000000.tar   one sample per subject
    manifest.json                                             written last: the commit point
    _pending/plan.json, _pending/<shard>.json                 only while a job is unfinished

The job is a deterministic function of (subject list, seed, subjects per shard, split sizes):
subjects are split train/val/test and cut into shards by a seeded permutation, and tars are
written byte-for-byte reproducibly. ``_pending/plan.json`` is written before any shard; each
finished shard gets a record (sha256, counts, rejections) after its tar is in place. Every
file is published atomically (rename of a temporary on a local disk; a single PUT on object
stores, which never expose a partial object). A re-run therefore keeps the shards whose
checksums match their records, rewrites the rest, and, once a manifest exists, does nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task,
                           TextColumn, TimeRemainingColumn)
from rich.text import Text
from webdataset import TarWriter

from sharding.format import MANIFEST_NAME, Manifest, ShardInfo, encode_subject
from sharding.plan import DEFAULT_SUBJECTS_PER_SHARD, PlannedShard, ShardingError, plan_shards
from sharding.sources import Source, parse_source
from sharding.storage import check_writable, open_fs
from sharding.validate import MIN_SESSIONS, Rejected, clean_subject

PENDING = "_pending"


@dataclass
class _Job:
    """What a worker needs; inherited by forked workers, never pickled."""

    source: Source
    url: str
    storage_options: dict[str, Any]


_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job


def write_shards(source: Source | str, url: str, *, seed: int = 0,
                 subjects_per_shard: int = DEFAULT_SUBJECTS_PER_SHARD,
                 val_subjects: int | None = None, test_subjects: int | None = None,
                 workers: int = 1, progress: bool = False,
                 storage_options: dict[str, Any] | None = None) -> Manifest:
    """Shard ``source`` (a :class:`Source` or a spec string) to ``url``; return the manifest.

    Idempotent and resumable (see the module docstring). Fails before any work if ``url``
    is not writable. ``val_subjects``/``test_subjects`` default to
    :func:`~sharding.plan.default_holdout`.
    """
    source = parse_source(source) if isinstance(source, str) else source
    storage_options = storage_options or {}
    fs, root = check_writable(url, **storage_options)
    identity = {**source.describe(), "sharding": {
        "subjects_per_shard": subjects_per_shard, "val_subjects": val_subjects,
        "test_subjects": test_subjects}}
    manifest = _existing_manifest(fs, root)
    if manifest is not None:
        if manifest.source != identity or manifest.seed != seed:
            raise ShardingError(f"{url} already holds a different shard set (source "
                                f"{manifest.source}, seed {manifest.seed}; this job: source "
                                f"{identity}, seed {seed}); write to another location")
        _remove_pending(fs, root)
        return manifest

    subject_ids, rejected = source.open()
    plan = plan_shards(subject_ids, seed=seed, subjects_per_shard=subjects_per_shard,
                       val_subjects=val_subjects, test_subjects=test_subjects)
    _commit_plan(fs, root, url, {"source": identity, "seed": seed,
                                 "shards": [asdict(s) for s in plan]})
    _remove_temporaries(fs, root)
    job = _Job(source, url, storage_options)
    records = _run(plan, job, workers, progress)

    shards, subjects = [], {}
    for record in records:
        info = ShardInfo(**record["shard"])
        shards.append(info)
        subjects.update(dict.fromkeys(record["subjects"], info.name))
        rejected.update(record["rejected"])
    manifest = Manifest(source=identity, seed=seed, shards=shards, subjects=subjects,
                        rejected=dict(sorted((+rejected).items())))
    _publish(fs, f"{root}/{MANIFEST_NAME}", manifest.to_json().encode())
    _remove_pending(fs, root)
    return manifest


def _run(plan: list[PlannedShard], job: _Job, workers: int, progress: bool) -> list[dict]:
    """Ensure every planned shard exists and verifies; records in plan order."""
    records: dict[str, dict] = {}
    bar = _progress(progress)
    with bar:
        task = bar.add_task("sharding", total=sum(len(s.subjects) for s in plan))
        if workers <= 1:
            _init_worker(job)
            for shard in plan:
                records[shard.name] = _ensure_shard(shard)
                bar.advance(task, len(shard.subjects))
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("fork"),
                                     initializer=_init_worker, initargs=(job,)) as pool:
                pending = {pool.submit(_ensure_shard, shard): shard for shard in plan}
                while pending:
                    done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        shard = pending.pop(future)
                        try:
                            records[shard.name] = future.result()
                        except BaseException:
                            pool.shutdown(cancel_futures=True)  # finished shards stay for a re-run
                            raise
                        bar.advance(task, len(shard.subjects))
    return [records[shard.name] for shard in plan]


class _SpeedColumn(ProgressColumn):
    """Mean rate since the start: shards finish in bursts, so a windowed rate would jump."""

    def render(self, task: Task) -> Text:
        rate = task.completed / task.elapsed if task.elapsed else 0.0
        return Text(f"{rate:,.0f} subjects/s", style="progress.data.speed")


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _SpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


def _ensure_shard(shard: PlannedShard) -> dict:
    """Keep a finished shard whose checksum matches its record, else (re)write it."""
    assert _JOB is not None, "worker not initialised"
    fs, root = open_fs(_JOB.url, **_JOB.storage_options)
    path, record_path = f"{root}/{shard.name}", f"{root}/{PENDING}/{shard.name}.json"
    record = _read_json(fs, record_path)
    if record is not None and _matches(fs, path, record["shard"]):
        return record
    data, record = _build(shard, _JOB.source)
    _publish(fs, path, data)
    _publish(fs, record_path, json.dumps(record).encode())
    return record


def _build(shard: PlannedShard, source: Source) -> tuple[bytes, dict]:
    """The tar bytes of one shard and its record; bad sessions and subjects are counted."""
    rejected: Counter = Counter()
    kept: list[str] = []
    sessions = 0
    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False, mtime=0) as tar:  # fixed mtime: reproducible bytes
        for subject_id in shard.subjects:
            try:
                clean, dropped = clean_subject(source.load(subject_id))
            except Rejected as rejection:
                rejected[rejection.reason] += 1
                continue
            rejected.update(dropped)
            if len(clean) < MIN_SESSIONS:
                rejected["subject:too_few_sessions"] += 1
                continue
            tar.write(encode_subject(subject_id, clean))
            kept.append(subject_id)
            sessions += len(clean)
    data = buffer.getvalue()
    info = ShardInfo(shard.name, shard.split, len(kept), sessions, len(data),
                     hashlib.sha256(data).hexdigest())
    return data, {"shard": asdict(info), "subjects": kept, "rejected": dict(rejected)}


def _matches(fs: fsspec.AbstractFileSystem, path: str, info: dict) -> bool:
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return False
    return len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"]


def _publish(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``path`` appear whole or not at all."""
    if isinstance(fs, LocalFileSystem):
        folder, name = path.rsplit("/", 1)
        temporary = f"{folder}/.{name}.{os.getpid()}.tmp"
        fs.makedirs(folder, exist_ok=True)
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    else:  # an object store publishes an object only once its upload has completed
        fs.pipe_file(path, data)


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _existing_manifest(fs: fsspec.AbstractFileSystem, root: str) -> Manifest | None:
    try:
        return Manifest.from_json(fs.cat_file(f"{root}/{MANIFEST_NAME}").decode("utf-8"))
    except FileNotFoundError:
        return None


def _commit_plan(fs: fsspec.AbstractFileSystem, root: str, url: str, plan: dict) -> None:
    """Write the plan, or check that an unfinished job left the same one."""
    path = f"{root}/{PENDING}/plan.json"
    plan = json.loads(json.dumps(plan))  # compare as stored: tuples become lists
    previous = _read_json(fs, path)
    if previous is None:
        _publish(fs, path, json.dumps(plan).encode())
    elif previous != plan:
        raise ShardingError(f"{url} holds an unfinished job with another plan (source "
                            f"{previous['source']}, seed {previous['seed']}; if those match this "
                            "job, the source's subjects changed since); re-run it unchanged, or "
                            f"delete {url}/{PENDING} and its shards")


def _remove_temporaries(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Delete temporaries left by a killed run (only local disks have any)."""
    if not isinstance(fs, LocalFileSystem):
        return
    for folder in (root, f"{root}/{PENDING}"):
        for path in fs.ls(folder, detail=False):
            name = path.rsplit("/", 1)[-1]
            if name.startswith(".") and name.endswith(".tmp"):
                fs.rm_file(path)


def _remove_pending(fs: fsspec.AbstractFileSystem, root: str) -> None:
    if fs.exists(f"{root}/{PENDING}"):
        fs.rm(f"{root}/{PENDING}", recursive=True)
