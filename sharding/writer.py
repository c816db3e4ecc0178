"""Shard a :class:`~sharding.sources.Source` into WebDataset tars plus a manifest.

Layout under the output URL (a folder, ``file://`` or ``s3://bucket/prefix``)::

    train-000000.tar ... val-000000.tar ... test-000000.tar   one sample per subject
    rejects.json                                              which subjects were rejected, why
    manifest.json                                             written last: the commit point
    _pending/plan.json, _pending/<shard>.json                 only while a job is unfinished

The job is a deterministic function of (subject list, seed, shard sizes, split sizes):
subjects are split train/val/test and cut into shards by a seeded permutation, and tars are
written byte-for-byte reproducibly. ``_pending/plan.json`` is written before any shard; each
finished shard gets a record (sha256, counts, rejections) after its tar is in place. Every
file is published atomically (:func:`common.atomic.write_atomic`). A re-run therefore keeps
the shards whose checksums match their records and rewrites the rest; once a manifest exists,
a re-run checks every shard against it and rebuilds exactly the missing or corrupt ones (the
same bytes, since the job is deterministic), so re-running the command repairs a set.

One job at a time writes an output: the job holds ``_lock.json`` there from before it reads
its source until it ends (:func:`sharding.lock.output_lock`), and releases it on success,
on an error, on ``KeyboardInterrupt`` and on SIGTERM. A second job is refused, naming the
holder; the lock of a job that died on this machine is taken over, so re-running a killed job
resumes it.

Nothing is created at the output URL before the options and the storage have been checked,
and a job refused later (its source, its plan) leaves nothing behind; a job whose every
subject is rejected removes what it wrote and fails. A store that fails mid-job (a full disk,
a timeout) ends the job with one line naming the file and the cause, as does a source that
cannot be read; what was published before stays, whole, for a re-run to resume from.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import shlex
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from multiprocessing import get_context
from typing import Any

import fsspec
from webdataset import TarWriter

from sharding import output
from sharding.format import MANIFEST_NAME, Manifest, ShardInfo, encode_subject
from sharding.lock import OutputLock, output_lock
from sharding.parent_death import die_with_parent
from sharding.plan import (
    FORMER_MAX_SUBJECTS_PER_SHARD,
    MAX_SUBJECTS_PER_SHARD,
    PlannedShard,
    ShardingError,
    check_options,
    plan_shards,
)
from sharding.progress import shard_progress
from sharding.source_spec import parse_source, source_arguments
from sharding.sources import Source
from sharding.storage import check_writable, failures_named, open_fs
from sharding.validate import MIN_SESSIONS, Rejected, clean_subject


@dataclass
class _Job:
    """What a worker needs; inherited by forked workers, never pickled."""

    source: Source
    url: str
    storage_options: dict[str, Any]
    parent: int  # pid of the sharding process: its workers must not outlive it


_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job
    if job.parent != os.getpid():
        die_with_parent(job.parent)


def write_shards(source: Source | str, url: str, *, seed: int = 0,
                 subjects_per_shard: int | None = None, val_subjects: int | None = None,
                 test_subjects: int | None = None, split: str | None = None,
                 workers: int = 1, progress: bool = False,
                 storage_options: dict[str, Any] | None = None,
                 log: Callable[[str], None] | None = None, break_lock: bool = False) -> Manifest:
    """Shard ``source`` (a :class:`Source` or a spec string) to ``url``; return the manifest.

    Idempotent, resumable and self-repairing (see the module docstring). Fails before
    creating anything if an option is impossible or ``url`` is not writable, and with
    :class:`~sharding.lock.OutputLocked` if another job writes there (``break_lock``
    removes the lock of a job that is gone, see :func:`~sharding.lock.output_lock`).
    ``subjects_per_shard=None`` sizes shards automatically (:mod:`sharding.plan`);
    ``val_subjects``/``test_subjects`` default to :func:`~sharding.plan.default_holdout`;
    ``split`` puts every subject in that one split. ``log`` hears what a re-run of a
    finished set found and rewrote, and which stale lock it removed.
    """
    check_options(subjects_per_shard=subjects_per_shard, val_subjects=val_subjects,
                  test_subjects=test_subjects, split=split, workers=workers)
    source = parse_source(source) if isinstance(source, str) else source
    storage_options = storage_options or {}
    fs, root = check_writable(url, create=False, **storage_options)
    job = _Job(source, url, storage_options, os.getpid())
    sharding = {"subjects_per_shard": subjects_per_shard, "val_subjects": val_subjects,
                "test_subjects": test_subjects, **({"split": split} if split else {})}
    if subjects_per_shard is None:  # the automatic rule's cap, so a later default re-plans this set alike
        sharding["max_subjects_per_shard"] = MAX_SUBJECTS_PER_SHARD
    requested = {**source.describe(), "sharding": sharding}
    with (output_lock(fs, root, url, break_lock=break_lock, log=log) as lock,
          _released_on_sigterm(lock)):
        return _write_or_repair(job, requested, seed, workers, progress, log)


def _write_or_repair(job: _Job, requested: dict[str, Any], seed: int, workers: int,
                     progress: bool, log: Callable[[str], None] | None) -> Manifest:
    """Write the set, or check and repair the one already at the URL (under its lock)."""
    url = job.url
    fs, root = open_fs(url, **job.storage_options)
    manifest = output.existing_manifest(fs, root, url)
    if manifest is None:
        return _write_new(job, requested, seed, workers, progress)
    if manifest.seed != seed or _adopt(manifest.source, requested) is None:
        raise ShardingError(f"{url} already holds a different shard set (source "
                            f"{manifest.source}, seed {manifest.seed}; this job: source "
                            f"{requested}, seed {seed}); write to another location")
    rewritten = _repair(manifest, job, workers, progress)
    if log is not None:
        log(f"{url}: rewrote {_count(rewritten, 'missing or corrupt shard')} "
            f"({', '.join(rewritten)})" if rewritten
            else f"{url}: all {len(manifest.shards)} shards match the manifest")
    output.remove_pending(fs, root)
    return manifest


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _adopt(recorded: dict[str, Any], requested: dict[str, Any]) -> dict[str, Any] | None:
    """``recorded`` if ``requested`` names the same job, else ``None``.

    An automatic shard size accepts the size and the automatic cap a set was written with, so
    that re-running the command that wrote a set keeps (and repairs) it — including sets
    written when the default was a fixed 1,000 subjects per shard, or the automatic rule's cap
    was 1,000 (such records name no cap).
    """
    wanted = {**requested, "sharding": dict(requested["sharding"])}
    if wanted["sharding"]["subjects_per_shard"] is None:
        recorded_sharding = recorded.get("sharding", {})
        for key in ("subjects_per_shard", "max_subjects_per_shard"):
            wanted["sharding"].pop(key, None)
            if key in recorded_sharding:
                wanted["sharding"][key] = recorded_sharding[key]
    return recorded if json.loads(json.dumps(wanted)) == recorded else None


def _plan(subject_ids: list[str], identity: dict[str, Any], seed: int) -> list[PlannedShard]:
    sharding = identity["sharding"]
    return plan_shards(subject_ids, seed=seed, subjects_per_shard=sharding["subjects_per_shard"],
                       val_subjects=sharding["val_subjects"],
                       test_subjects=sharding["test_subjects"], split=sharding.get("split"),
                       max_subjects_per_shard=sharding.get("max_subjects_per_shard",
                                                           FORMER_MAX_SUBJECTS_PER_SHARD))


def _write_new(job: _Job, requested: dict[str, Any], seed: int, workers: int,
               progress: bool) -> Manifest:
    """Plan, write (or resume writing) every shard, then commit the manifest."""
    fs, root = open_fs(job.url, **job.storage_options)
    previous = output.read_json(fs, f"{root}/{output.PENDING}/plan.json")
    identity = (previous and _adopt(previous.get("source", {}), requested)) or requested
    with _reading_source(job.source):
        subject_ids, rejected = job.source.open()
    plan = _plan(subject_ids, identity, seed)
    output.commit_plan(fs, root, job.url, previous, {"source": identity, "seed": seed,
                                               "shards": [asdict(s) for s in plan]})
    output.remove_temporaries(fs, root)
    records = _run(plan, job, workers, progress, _ensure_shard)
    manifest = _manifest(records, rejected, identity, seed)
    rejects = [entry for record in records for entry in record["rejects"]]
    if not manifest.subjects:
        output.discard(fs, root, plan)
        raise ShardingError(_no_subjects_message(job, manifest.rejected, rejects))
    output.publish(fs, f"{root}/{output.REJECTS_NAME}", json.dumps({
        "rejected_subjects": len(rejects), "listed": rejects[:output.MAX_LISTED_REJECTS],
        "counts": manifest.rejected}, indent=1).encode())
    output.publish(fs, f"{root}/{MANIFEST_NAME}", manifest.to_json().encode())
    output.remove_pending(fs, root)
    return manifest


def _manifest(records: list[dict], rejected: Counter, identity: dict[str, Any],
              seed: int) -> Manifest:
    """The manifest of a job from its shards' records (and the rejections of listing)."""
    shards, subjects = [], {}
    for record in records:
        info = ShardInfo(**record["shard"])
        shards.append(info)
        subjects.update(dict.fromkeys(record["subjects"], info.name))
        rejected.update(record["rejected"])
    return Manifest(source=identity, seed=seed, shards=shards, subjects=subjects,
                    rejected=dict(sorted((+rejected).items())))


def _repair(manifest: Manifest, job: _Job, workers: int, progress: bool) -> list[str]:
    """Check every shard against the manifest; rebuild exactly the missing or corrupt ones
    (their names are returned)."""
    fs, root = open_fs(job.url, **job.storage_options)
    expected = {info.name: info for info in manifest.shards}
    with ThreadPoolExecutor(max(workers, 1)) as pool:  # reading and hashing release the GIL
        good = list(pool.map(lambda info: output.matches(fs, f"{root}/{info.name}", asdict(info)),
                             manifest.shards))
    bad = [info.name for info, ok in zip(manifest.shards, good) if not ok]
    if not bad:
        return []
    with _reading_source(job.source):
        subject_ids = job.source.open()[0]
    planned = {s.name: s for s in _plan(subject_ids, manifest.source, manifest.seed)}
    lost = [name for name in bad if name not in planned]
    if lost:
        raise ShardingError(f"cannot repair {job.url}: {lost[0]} is not in the plan of the "
                            "source as it is now (its subjects changed since sharding); "
                            "re-shard to another location")
    output.remove_temporaries(fs, root)
    _run([planned[name] for name in bad], job, workers, progress,
         partial(_repair_shard, expected))
    return bad


def _run(plan: list[PlannedShard], job: _Job, workers: int, progress: bool,
         task: Callable[[PlannedShard], dict]) -> list[dict]:
    """Apply ``task`` (picklable) to every planned shard, in worker processes; records in
    plan order."""
    records: dict[str, dict] = {}
    bar = shard_progress(progress)
    with bar:
        progress_task = bar.add_task("sharding", total=sum(len(s.subjects) for s in plan))
        for shard, record in _results(plan, job, workers, task):
            records[shard.name] = record
            bar.advance(progress_task, len(shard.subjects))
    return [records[shard.name] for shard in plan]


def _results(plan: list[PlannedShard], job: _Job, workers: int,
             task: Callable[[PlannedShard], dict]) -> Iterator[tuple[PlannedShard, dict]]:
    """``(shard, record)`` as shards finish; the first failure stops the rest."""
    if workers <= 1:
        _init_worker(job)
        for shard in plan:
            yield shard, task(shard)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_init_worker,
                             initargs=(job,)) as pool:
        pending = {pool.submit(task, shard): shard for shard in plan}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    yield pending.pop(future), future.result()
        except BaseException:  # a failed shard, or KeyboardInterrupt: start no other shard
            pool.shutdown(wait=False, cancel_futures=True)  # finished shards stay for a re-run
            raise


@contextmanager
def _released_on_sigterm(lock: OutputLock) -> Iterator[None]:
    """While a job runs, SIGTERM kills its workers, releases its lock, then ends this process
    as SIGTERM would; what was published stays for a re-run.

    Outside the main thread no handler can be installed: the workers' parent-death signal
    still ends them, and the next job on this machine takes the dead job's lock over.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, _frame: Any) -> None:
        for child in multiprocessing.active_children():
            child.kill()
        with contextlib.suppress(Exception):  # a failing store leaves the lock: see output_lock
            lock.release()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _worker_fs() -> tuple[_Job, fsspec.AbstractFileSystem, str]:
    assert _JOB is not None, "worker not initialised"
    fs, root = open_fs(_JOB.url, **_JOB.storage_options)
    return _JOB, fs, root


def _ensure_shard(shard: PlannedShard) -> dict:
    """Keep a finished shard whose checksum matches its record, else (re)write it."""
    job, fs, root = _worker_fs()
    path, record_path = f"{root}/{shard.name}", f"{root}/{output.PENDING}/{shard.name}.json"
    record = output.read_json(fs, record_path)
    if record is not None and "rejects" in record and output.matches(fs, path, record["shard"]):
        return record
    data, record = _build(shard, job.source)
    output.publish(fs, path, data)
    output.publish(fs, record_path, json.dumps(record).encode())
    return record


def _repair_shard(expected: dict[str, ShardInfo], shard: PlannedShard) -> dict:
    """Rebuild one shard of a committed set; refuse to publish bytes the manifest would not."""
    job, fs, root = _worker_fs()
    data, record = _build(shard, job.source)
    if record["shard"] != asdict(expected[shard.name]):
        raise ShardingError(f"cannot repair {job.url}/{shard.name}: rebuilt from the source it "
                            "differs from the manifest (the source changed since sharding); "
                            "re-shard to another location")
    output.publish(fs, f"{root}/{shard.name}", data)
    return record


def _build(shard: PlannedShard, source: Source) -> tuple[bytes, dict]:
    """The tar bytes of one shard and its record; bad sessions and subjects are counted,
    rejected subjects listed with the reason (the file and line, where there is one)."""
    rejected: Counter = Counter()
    rejects: list[dict[str, str]] = []
    kept: list[str] = []
    sessions = 0
    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False, mtime=0) as tar:  # fixed mtime: reproducible bytes
        for subject_id in shard.subjects:
            clean, reason, detail = _load_clean(source, subject_id, rejected)
            if reason is not None:
                rejected[reason] += 1
                rejects.append({"subject": subject_id, "reason": reason, "detail": detail})
                continue
            tar.write(encode_subject(subject_id, clean))
            kept.append(subject_id)
            sessions += len(clean)
    data = buffer.getvalue()
    info = ShardInfo(shard.name, shard.split, len(kept), sessions, len(data),
                     hashlib.sha256(data).hexdigest())
    return data, {"shard": asdict(info), "subjects": kept, "rejected": dict(rejected),
                  "rejects": rejects}


def _load_clean(source: Source, subject_id: str,
                rejected: Counter) -> tuple[dict[str, Any], str | None, str]:
    """One subject's valid sessions, or the reason and detail of its rejection."""
    try:
        with _reading_source(source):
            sessions, unreadable = source.load_counted(subject_id)
        clean, dropped = clean_subject(sessions)
    except Rejected as rejection:
        return {}, rejection.reason, rejection.detail
    dropped.update(unreadable)
    rejected.update(dropped)
    if len(clean) >= MIN_SESSIONS:
        return clean, None, ""
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items()))
    total = len(sessions) + sum(unreadable.values())
    return {}, "subject:too_few_sessions", (f"{len(clean)} valid of {total} sessions"
                                            + (f" (dropped: {why})" if why else ""))


def _no_subjects_message(job: _Job, rejected: dict[str, int],
                         rejects: list[dict[str, str]]) -> str:
    counts = ", ".join(f"{reason} {n}" for reason, n in rejected.items())
    example = f"; e.g. {output.format_reject(rejects[0])}" if rejects else ""
    return (f"no valid subject in the source {_source_name(job.source)} (rejected: "
            f"{counts or 'none'}){example}; nothing was written to {job.url}")


def _source_name(source: Source) -> str:
    """The source as its spec names it (``kvc:/data/kvc:desktop``), else its kind."""
    arguments = source_arguments(source.describe())
    return arguments[1] if arguments else str(source.describe().get("kind"))


def _reading_source(source: Source) -> contextlib.AbstractContextManager[None]:
    """A failure to read the source (an unreadable file, a failing disk) as one line naming the
    source and the file: it is not the output's storage that failed."""
    return failures_named(f"cannot read the source {_source_name(source)}")


def rerun_command(manifest: Manifest, url: str) -> str | None:
    """The ``eerpipe shard`` command that re-checks the set at ``url`` and rewrites its bad
    shards; ``None`` if the manifest's source cannot be named by a spec."""
    arguments = source_arguments(manifest.source)
    if arguments is None:
        return None
    sharding = manifest.source.get("sharding", {})
    for option, key in (("--subjects-per-shard", "subjects_per_shard"),
                        ("--val-subjects", "val_subjects"), ("--test-subjects", "test_subjects"),
                        ("--split", "split")):
        if sharding.get(key) is not None:
            arguments += [option, str(sharding[key])]
    return shlex.join(["eerpipe", "shard", *arguments, "--out", url, "--seed", str(manifest.seed)])
