"""One launch at a time trains a run: the leased lock of the run's folder, locally and
on S3 (a moto server), without Ray.

A lock's lease is judged only where its holder's process cannot be seen (another host or
container): here that is a record written as another node leaves it, or a holder in this process
judged as if it ran elsewhere (``seen_from_another_host``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import sharding.lock
from common.atomic import replace_if
from pipeline.training.driver import run_lock
from sharding.lock import LOCK_NAME, OutputLocked, output_lock
from sharding.storage import StorageError, open_fs
from tests.test_stages import staged
from tests.test_train import shards  # noqa: F401 - the fixture

TOKEN = "e" * 32


def a_run_folder(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh run folder: a local one, or a prefix on the moto S3 server."""
    return str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_url")


def leave_a_lock(run_dir: str, renewed_ago_s: float, lease_s: float = 120.0) -> None:
    """The lock of a run on another node (``node-7``, pid 4242), last renewed ``renewed_ago_s``
    seconds ago, as that node left it when its pod went away."""
    renewed = datetime.now(timezone.utc) - timedelta(seconds=renewed_ago_s)
    fs, root = open_fs(run_dir)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{LOCK_NAME}", json.dumps({
        "host": "node-7", "pid": 4242, "process": "another-boot/1/4242/99",
        "started": "2026-01-05T08:00:00+00:00", "token": TOKEN,
        "lease_s": lease_s, "renewed": renewed.isoformat(timespec="milliseconds")}).encode())


def the_lock(run_dir: str) -> dict[str, Any] | None:
    fs, root = open_fs(run_dir)
    fs.invalidate_cache()
    try:
        return json.loads(fs.cat_file(f"{root}/{LOCK_NAME}"))
    except FileNotFoundError:
        return None


@pytest.fixture
def seen_from_another_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every holder's process is out of sight, as a holder on another node is: only its lease
    tells whether it is gone."""
    monkeypatch.setattr(sharding.lock, "_still_running", lambda holder: None)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_lock_whose_lease_ran_out_on_another_host_is_taken_over_saying_so(
        where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    run_dir = a_run_folder(where, tmp_path, request)
    leave_a_lock(run_dir, renewed_ago_s=121)

    with pytest.warns(UserWarning, match=f"{run_dir}: removed the lock of pid 4242 on node-7, started "
                                         r"2026-01-05T08:00:00\+00:00 .*\(its lease ran out at "):
        with run_lock(run_dir):
            held = the_lock(run_dir)
    assert held["pid"] == os.getpid() and held["token"] != TOKEN and held["lease_s"] == 120
    assert the_lock(run_dir) is None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_lock_renewed_within_its_lease_on_another_host_is_refused_naming_the_holder_and_the_lease_s_end(
        where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    run_dir = a_run_folder(where, tmp_path, request)
    leave_a_lock(run_dir, renewed_ago_s=60)
    with pytest.raises(OutputLocked) as refusal, run_lock(run_dir):
        pass
    message = str(refusal.value)
    assert "\n" not in message
    assert message.startswith(f"{run_dir} is locked by another training run: pid 4242 on node-7, "
                              "started 2026-01-05T08:00:00+00:00")
    assert "relaunch once its lease runs out at " in message
    assert the_lock(run_dir)["token"] == TOKEN


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_live_holder_renews_its_lease_so_that_it_is_never_taken_over(
        where: str, tmp_path: Path, request: pytest.FixtureRequest, seen_from_another_host: None) -> None:
    run_dir = a_run_folder(where, tmp_path, request)
    fs, root = open_fs(run_dir)
    with output_lock(fs, root, run_dir, job="training run", lease=0.6) as lock:
        first = the_lock(run_dir)
        time.sleep(2)  # more than three leases
        with pytest.raises(OutputLocked, match="locked by another training run"):
            with output_lock(fs, root, run_dir, job="training run", lease=0.6):
                pass
        renewed = the_lock(run_dir)
        assert renewed["token"] == first["token"] == lock.record["token"]
        assert renewed["renewed"] > first["renewed"]
    assert the_lock(run_dir) is None


def test_a_renewal_that_went_through_but_answered_changed_keeps_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a conditional write whose reply was lost answers when retried: the lock is read back."""
    import sharding.lock

    def written_but_answered_changed(fs: Any, path: str, data: bytes, wanted: Any) -> bool:
        fs.pipe_file(path, data)
        return False

    monkeypatch.setattr(sharding.lock, "replace_if", written_but_answered_changed)
    run_dir = str(tmp_path / "run")
    fs, root = open_fs(run_dir)
    with output_lock(fs, root, run_dir, job="training run", lease=0.3) as lock:
        time.sleep(1)  # three renewals
        assert not lock.lost
    assert the_lock(run_dir) is None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_holder_whose_lock_was_taken_over_fails_at_its_end_and_leaves_the_new_holder_s_lock(
        where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    run_dir = a_run_folder(where, tmp_path, request)
    fs, root = open_fs(run_dir)
    with pytest.raises(OutputLocked, match=f"{run_dir}: this training run's lock was taken over or "
                                           "removed while it ran"):
        with output_lock(fs, root, run_dir, job="training run", lease=0.3) as lock:
            leave_a_lock(run_dir, renewed_ago_s=0)  # another run took it over
            deadline = time.monotonic() + 30
            while not lock.lost:
                assert time.monotonic() < deadline, "the holder never noticed"
                time.sleep(0.05)
    assert the_lock(run_dir)["token"] == TOKEN


def test_a_run_interrupted_by_ctrl_c_releases_its_leased_lock_and_stops_renewing(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    fs, root = open_fs(run_dir)
    with pytest.raises(KeyboardInterrupt), output_lock(fs, root, run_dir, lease=0.3) as lock:
        raise KeyboardInterrupt
    assert not [thread for thread in threading.enumerate() if thread.name == f"renew {lock.path}"]
    assert not Path(run_dir).exists()  # the lock, and the folder it created, are gone


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_file_is_replaced_only_if_it_holds_what_is_wanted(
        where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    fs, root = open_fs(a_run_folder(where, tmp_path, request))
    path = f"{root}/{LOCK_NAME}"
    assert not replace_if(fs, path, b"new", lambda data: True) and not fs.exists(path)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(path, b"ours")
    assert not replace_if(fs, path, b"new", lambda data: data == b"theirs")
    assert fs.cat_file(path) == b"ours"
    assert replace_if(fs, path, b"new", lambda data: data == b"ours")
    fs.invalidate_cache()
    assert fs.cat_file(path) == b"new"


def test_on_s3_a_file_replaced_between_the_check_and_the_write_is_kept(s3_url: str) -> None:
    fs, root = open_fs(s3_url)
    path = f"{root}/{LOCK_NAME}"
    fs.pipe_file(path, b"ours")

    def replaced_meanwhile(data: bytes) -> bool:
        fs.pipe_file(path, b"another run's")
        return data == b"ours"

    assert not replace_if(fs, path, b"renewed", replaced_meanwhile)
    assert fs.cat_file(path) == b"another run's"


def test_a_staged_run_is_refused_while_another_launch_holds_its_folder_before_any_stage_starts(
        shards: str, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    import ray

    from pipeline.training import train

    config = staged(shards, tmp_path, "wandb.enabled=false")
    with run_lock(config.run_dir):
        held = the_lock(config.run_dir)
        with pytest.raises(OutputLocked, match=f"{config.run_dir} is locked by another training run: pid "
                                               f"{os.getpid()} on {socket.gethostname()}"):
            train(config, show_progress=False)
        assert the_lock(config.run_dir)["token"] == held["token"]
    assert not ray.is_initialized()


def test_a_bad_lease_setting_is_refused_by_name_before_anything_is_created(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EERPIPE_LOCK_LEASE", "soon")
    with pytest.raises(StorageError, match="EERPIPE_LOCK_LEASE='soon': expected a positive"):
        with run_lock(str(tmp_path / "run")):
            pass
    assert not (tmp_path / "run").exists()
