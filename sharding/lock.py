"""One job at a time writes an output: the lock ``_lock.json`` of a shard set or a training run.

A training run's lock (:func:`output_lock` with a lease) outlives its holder's last renewal by
``EERPIPE_LOCK_LEASE`` seconds (default 120, renewed every 40): a run preempted with its pod can
be resumed on another node two minutes after its last renewal at most (about the time a pod
takes to be rescheduled), while a live run's lock can be taken only after its renewals failed
for two minutes (a store that long down fails the run's checkpoints too).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from common.atomic import create_exclusive, remove_if, replace_if
from sharding.storage import STORAGE_FAILURES, StorageError, describe_failure, failures_named, setting

LOCK_NAME = "_lock.json"
LOCK_LEASE_ENV = "EERPIPE_LOCK_LEASE"
DEFAULT_LOCK_LEASE_S = 120.0


class OutputLocked(StorageError):
    """Another job holds the lock of the output (see :func:`output_lock`)."""


def lock_lease() -> float:
    """Seconds a training run's lock outlives its last renewal (``EERPIPE_LOCK_LEASE``, see the
    module docstring)."""
    return setting(LOCK_LEASE_ENV, DEFAULT_LOCK_LEASE_S, float)


@dataclass
class OutputLock:
    """The lock this process holds on an output; ``record`` says who holds it and since when.
    ``lost`` says whether another job took it over while this one held it (a leased lock whose
    renewals came too late)."""

    fs: fsspec.AbstractFileSystem
    path: str
    record: dict[str, Any]
    lost: bool = False
    _stopped: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _renewals: threading.Thread | None = field(default=None, init=False, repr=False)

    def keep_renewing(self) -> None:
        """Renew the record every third of its lease from a daemon thread: a run that stops
        renewing (killed, preempted, cut off from the store) loses the lock one lease later."""
        self._renewals = threading.Thread(target=self._renew_until_released, daemon=True,
                                          name=f"renew {self.path}")
        self._renewals.start()

    def release(self) -> None:
        """Stop renewing, then remove the lock if it is still ours (``--break-lock`` or a takeover
        may have given it to another job). Only the process that took it releases it: forked
        workers inherit this object."""
        if os.getpid() != self.record["pid"]:
            return
        self._stopped.set()
        if self._renewals is not None:
            self._renewals.join()  # a renewal in flight would otherwise rewrite a removed lock
        remove_if(self.fs, self.path, _holding(self.record["token"]))

    def _renew_until_released(self) -> None:
        """Renew until released; stop for good, saying so at once, once the lock is no longer
        ours. A renewal that fails is tried again at the next interval (the store may answer
        again before the lease runs out), with one warning once renewals have failed for half
        the lease."""
        lease, last_renewed, warned = self.record["lease_s"], time.monotonic(), False
        while not self._stopped.wait(lease / 3):
            try:
                if not self._renew():
                    self.lost = True
                    warnings.warn(f"{self.path}: the lock was taken over or removed while this job ran",
                                  stacklevel=2)
                    return
                last_renewed, warned = time.monotonic(), False
            except Exception as error:  # noqa: BLE001 - any failure: the next interval tries again
                if not warned and time.monotonic() - last_renewed > lease / 2:
                    warnings.warn(f"{self.path}: the lock's renewals have failed for "
                                  f"{time.monotonic() - last_renewed:.0f} s of its {lease:g} s lease: "
                                  f"{describe_failure(error)}", stacklevel=2)
                    warned = True

    def _renew(self) -> bool:
        """Rewrite the record with a new renewal time, if the lock is still ours. A write that
        went through can answer "changed" (its reply lost, the retried conditional write finds
        our own new version), so the lock is read back before it is given up."""
        renewed = {**self.record, "renewed": _renewal_time()}
        token = self.record["token"]
        if replace_if(self.fs, self.path, json.dumps(renewed).encode(), _holding(token)):
            self.record = renewed
            return True
        holder = _read_holder(self.fs, self.path)
        return holder is not None and holder.get("token") == token


@contextmanager
def output_lock(fs: fsspec.AbstractFileSystem, root: str, url: str, *, break_lock: bool = False,
                log: Callable[[str], None] | None = None, job: str = "shard job",
                lease: float | None = None) -> Iterator[OutputLock]:
    """Hold ``{url}/_lock.json`` while the block runs: one ``job`` at a time writes an output.

    The lock is created only if absent (:func:`common.atomic.create_exclusive`) and records
    the job's host, pid, start time and a unique token. A second job is refused, naming the
    output and the holder. A lock whose process is gone is taken over when that is knowable:
    the holder ran on this machine, in this pid namespace, and no longer runs. Elsewhere (another
    host or container, or any S3 job whose process cannot be seen from here):

    - without a ``lease`` (shard jobs), ``break_lock`` removes it, once the user has made sure no
      job runs. Such a lock does not expire with age: a job may run for hours;
    - with a ``lease`` in seconds (training runs, which Kubernetes may preempt and resubmit on
      another node), the holder renews its record every ``lease / 3`` seconds, and a lock not
      renewed for ``lease`` seconds is taken over: its holder is gone or cut off from the store.
      A holder that finds its lock taken over when it renews fails once its block ends.

    A holder that still runs here is never broken. The lock is released when the block ends, by
    an error or ``KeyboardInterrupt`` too (then best effort: see :func:`_release_after_failure`);
    the local folders created for the lock are removed if the job left them empty.
    """
    created = _missing_folders(fs, root)
    try:
        with failures_named(f"cannot lock {url}"):
            lock = _acquire(fs, f"{root}/{LOCK_NAME}", url, _this_job(lease), break_lock, log, job)
        if lease is not None:
            lock.keep_renewing()
        try:
            yield lock
        except BaseException:
            _release_after_failure(lock, url)
            raise
        with failures_named(_cannot_release(url)):
            lock.release()
        if lock.lost:
            raise OutputLocked(f"{url}: this {job}'s lock was taken over or removed while it ran (a "
                               f"renewal came more than {lease:g} s after the last): another {job} "
                               "may have written there too")
    finally:
        for folder in created:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


def _release_after_failure(lock: OutputLock, url: str) -> None:
    """Release the lock of a failed job, with one warning if the store fails that too: a store
    that is down fails the job and then its release, and the job's own error is the one to
    report."""
    try:
        lock.release()
    except STORAGE_FAILURES as error:
        warnings.warn(f"{_cannot_release(url)}: {describe_failure(error)}; a later job on this "
                      f"machine takes it over (elsewhere: {_way_out(lock.record)})", stacklevel=2)


def _cannot_release(url: str) -> str:
    return f"cannot release the lock of {url}"


def _missing_folders(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The local folders down to ``root`` that do not exist yet, deepest first."""
    if not isinstance(fs, LocalFileSystem):
        return []
    missing, folder = [], Path(root)
    while not folder.exists():
        missing.append(str(folder))
        folder = folder.parent
    return missing


def _acquire(fs: fsspec.AbstractFileSystem, path: str, url: str, record: dict[str, Any],
             break_lock: bool, log: Callable[[str], None] | None, job: str) -> OutputLock:
    for _ in range(3):  # again after a holder released or a stale lock was removed
        holder = _create_and_read_back(fs, path, record)
        if holder is None:  # released between the create and the read
            continue
        if holder.get("token") == record["token"]:  # ours, whatever the create answered
            return OutputLock(fs, path, record)
        _remove_stale(fs, path, url, holder, break_lock, log, job)
    raise OutputLocked(f"{url}: could not take the lock {LOCK_NAME}; other jobs keep taking it")


def _create_and_read_back(fs: fsspec.AbstractFileSystem, path: str,
                          record: dict[str, Any]) -> dict[str, Any] | None:
    """Try to create the lock; return the record it then holds (``None``: no lock).

    The lock is read back whatever the create answered: a create that went through can answer
    "exists" (:func:`common.atomic.create_exclusive`), and the job then holds the lock; on a
    store that ignored the upload's condition a later job would overwrite it, and only the
    last writer reads its own token (best effort there; AWS S3, MinIO and moto honour it).
    """
    create_exclusive(fs, path, json.dumps(record).encode())
    return _read_holder(fs, path)


def _remove_stale(fs: fsspec.AbstractFileSystem, path: str, url: str, holder: dict[str, Any],
                  break_lock: bool, log: Callable[[str], None] | None, job: str) -> None:
    """Remove a lock whose job is gone (its process, or its lease, ran out) or that the user
    breaks; refuse a live one.

    Only the lock judged is removed (:func:`common.atomic.remove_if`): jobs that judge the
    same dead lock at once would otherwise each remove the lock the other just took."""
    running = _still_running(holder)
    if running is False:
        why = "its process is no longer running"
    elif running is None and _lease_expired(holder):
        end = _lease_end(holder)
        assert end is not None  # an expired lease has an end
        why = f"its lease ran out at {end.isoformat(timespec='seconds')}"
    elif break_lock and running is None:
        why = "--break-lock"
    elif break_lock:
        raise OutputLocked(f"{url} is locked by {_describe(holder)}, which is still running on "
                           "this machine: stop it first (--break-lock removes only the locks of "
                           "jobs that are gone)")
    else:
        raise OutputLocked(f"{url} is locked by another {job}: {_describe(holder)}; wait for it "
                           f"to finish, or, if it is no longer running, {_way_out(holder)}")
    if remove_if(fs, path, _holding(holder.get("token"))) and log is not None:
        log(f"{url}: removed the lock of {_describe(holder)} ({why})")


def _this_job(lease: float | None) -> dict[str, Any]:
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "process": _process_identity(os.getpid()),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "token": uuid.uuid4().hex}
    return record if lease is None else record | {"lease_s": lease, "renewed": _renewal_time()}


def _renewal_time() -> str:
    """Now, to the millisecond: a lease may be a few seconds long."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _lease_end(holder: dict[str, Any]) -> datetime | None:
    """When a leased lock runs out unless renewed; ``None`` without a (readable) lease."""
    try:
        renewed = datetime.fromisoformat(str(holder["renewed"]))
        end = renewed + timedelta(seconds=float(holder["lease_s"]))
    except (KeyError, TypeError, ValueError, OverflowError):  # no lease, or not a time
        return None
    return end if end.tzinfo is not None else None


def _lease_expired(holder: dict[str, Any]) -> bool:
    """Whether a leased lock went unrenewed for its lease: its holder is gone, or cut off from
    the store (hosts' clocks are compared: NTP keeps them far closer than a lease)."""
    end = _lease_end(holder)
    return end is not None and end < datetime.now(timezone.utc)


def _way_out(holder: dict[str, Any]) -> str:
    """What frees a lock whose holder may be gone, where that cannot be seen from here."""
    end = _lease_end(holder)
    if end is None:
        return "re-run with --break-lock"
    return f"relaunch once its lease runs out at {end.isoformat(timespec='seconds')}"


def _read_holder(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """The lock's record; ``None`` if there is no lock, ``{}`` if it is unreadable."""
    try:
        return _parse_record(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _parse_record(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _holding(token: str | None) -> Callable[[bytes], bool]:
    """Whether a lock's content is the record with ``token`` (``None``: an unreadable one)."""
    return lambda data: _parse_record(data).get("token") == token


def _process_identity(pid: int) -> str | None:
    """``boot id/pid namespace/pid/start tick``: one process on one machine, for as long as it
    runs (a reused pid has another start tick); ``None`` if it does not run, or off Linux."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return f"{boot}/{namespace}/{pid}/{start}"


def _still_running(holder: dict[str, Any]) -> bool | None:
    """Whether the holder's process runs; ``None`` where that cannot be seen from here (another
    machine or pid namespace, or an unreadable lock)."""
    recorded, mine, pid = holder.get("process"), _process_identity(os.getpid()), holder.get("pid")
    if not (isinstance(recorded, str) and isinstance(pid, int) and mine is not None):
        return None
    if recorded.rsplit("/", 2)[0] != mine.rsplit("/", 2)[0]:
        return None
    return _process_identity(pid) == recorded


def _describe(holder: dict[str, Any]) -> str:
    if not {"pid", "host", "started"} <= holder.keys():
        return "an unknown job (the lock file is unreadable)"
    return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}{_age(holder)}"


def _age(holder: dict[str, Any]) -> str:
    try:
        minutes = int((datetime.now(timezone.utc) - datetime.fromisoformat(str(holder["started"])))
                      .total_seconds() // 60)
    except (TypeError, ValueError):  # not a time, or one without a time zone
        return ""
    hours = f"{minutes // 60} h " if minutes >= 60 else ""
    return f" ({hours}{minutes % 60} min ago)"
