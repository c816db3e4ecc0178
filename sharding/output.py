"""The files of a shard set's output folder other than the shards: the pending plan and per-shard
records of an unfinished job, ``rejects.json``, and the manifest as a job finds it.

Every write is whole (atomic) and every failure of the store is one line naming the file, so a
killed or failed job leaves a folder that the same command resumes or repairs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from common.atomic import is_temporary, write_atomic
from sharding.format import MANIFEST_NAME, Manifest, manifest_location
from sharding.plan import PlannedShard, ShardingError
from sharding.storage import failures_named, location, open_fs

PENDING = "_pending"
REJECTS_NAME = "rejects.json"
MAX_LISTED_REJECTS = 100


def format_reject(entry: dict[str, str]) -> str:
    """One rejected subject as a line: id, reason, and where in which file."""
    detail = f": {entry['detail']}" if entry.get("detail") else ""
    return f"{entry['subject']} ({entry['reason']}){detail}"


def read_rejects(url: str, **storage_options: Any) -> dict[str, Any] | None:
    """The ``rejects.json`` of a shard set (``None`` for sets written before it existed)."""
    fs, root = open_fs(url, **storage_options)
    return read_json(fs, f"{root}/{REJECTS_NAME}")


def publish(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Publish one file whole; a full disk or a failing store is one line naming the file."""
    with failures_named(f"cannot write {location(fs, path)}",
                        "nothing partial was left; re-run the same command to resume"):
        write_atomic(fs, path, data)


def reading(fs: fsspec.AbstractFileSystem, path: str) -> contextlib.AbstractContextManager[None]:
    """A failure to read a file of the output (a missing one is an answer) as one line naming it."""
    return failures_named(f"cannot read {location(fs, path)}")


def cleaning(fs: fsspec.AbstractFileSystem, root: str) -> contextlib.AbstractContextManager[None]:
    """A failure to remove what a job no longer needs as one line naming the output."""
    return failures_named(f"cannot clean up {location(fs, root)}")


def matches(fs: fsspec.AbstractFileSystem, path: str, info: dict) -> bool:
    try:
        with reading(fs, path):
            data = fs.cat_file(path)
    except FileNotFoundError:
        return False
    return len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"]


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    try:
        with reading(fs, path):
            data = fs.cat_file(path)
        return json.loads(data)
    except FileNotFoundError:
        return None
    except ValueError as error:  # a file we write atomically: only a person can have broken it
        raise ShardingError(f"{path}: not valid JSON ({error}); delete it to start over") from error


def existing_manifest(fs: fsspec.AbstractFileSystem, root: str, url: str) -> Manifest | None:
    path = f"{root}/{MANIFEST_NAME}"
    try:
        with reading(fs, path):
            data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    return Manifest.from_json(data, manifest_location(url))


def commit_plan(fs: fsspec.AbstractFileSystem, root: str, url: str, previous: Any,
                 plan: dict) -> None:
    """Write the plan, or check that an unfinished job left the same one."""
    plan = json.loads(json.dumps(plan))  # compare as stored: tuples become lists
    if previous is None:
        publish(fs, f"{root}/{PENDING}/plan.json", json.dumps(plan).encode())
    elif previous != plan:
        raise ShardingError(f"{url} holds an unfinished job with another plan (source "
                            f"{previous.get('source')}, seed {previous.get('seed')}; if those "
                            "match this job, the source's subjects changed since); re-run it "
                            f"unchanged, or delete {url}/{PENDING} and its shards")


def remove_temporaries(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Delete temporaries left by a killed run (only local disks have any)."""
    if not isinstance(fs, LocalFileSystem):
        return
    with cleaning(fs, root):
        for folder in (root, f"{root}/{PENDING}"):
            if fs.isdir(folder):
                for path in fs.ls(folder, detail=False):
                    if is_temporary(path.rsplit("/", 1)[-1]):
                        fs.rm_file(path)


def discard(fs: fsspec.AbstractFileSystem, root: str, plan: list[PlannedShard]) -> None:
    """Remove what a failed job wrote (its folder goes with the lock, if the job created it)."""
    with cleaning(fs, root):
        for shard in plan:
            if fs.exists(f"{root}/{shard.name}"):
                fs.rm_file(f"{root}/{shard.name}")
    remove_pending(fs, root)


def remove_pending(fs: fsspec.AbstractFileSystem, root: str) -> None:
    with cleaning(fs, root):
        if fs.exists(f"{root}/{PENDING}"):
            fs.rm(f"{root}/{PENDING}", recursive=True)
