"""`eerpipe shard` under misuse and failure (issue 35): one job per output (jobs racing for a
dead job's lock, a store that answers "exists" to a create that went through, a lock the store
cannot release), bounded waits on S3, inputs that would hang or flood the reader, an unreadable
source, a full disk, malformed Aalto rows.

Every failure is one line on stderr naming the input, and loses nothing: what was published
stays whole, and re-running the command finishes the job.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from s3fs import S3FileSystem
from typer.testing import CliRunner, Result

import sharding.lock
from common.atomic import remove_if
from pipeline.cli import app
from sharding.aalto import MAX_PARTICIPANT_FILE_BYTES
from sharding.format import MANIFEST_NAME, load_manifest
from sharding.lock import LOCK_NAME, OutputLock, OutputLocked, output_lock
from sharding.output import PENDING, REJECTS_NAME
from sharding.sources import SynthSource
from sharding.storage import PROBE_READ_TIMEOUT_S, READ_TIMEOUT_ENV, StorageError, _probing_fs, open_fs
from sharding.verify import read_shard, verify_shards
from sharding.writer import write_shards
from tests.loopback import server_that_never_answers

runner = CliRunner()


def shard(*arguments: str) -> Result:
    return runner.invoke(app, ["shard", *arguments, "--workers", "1", "--no-progress"])


def flat(text: str) -> str:
    """``text`` with every run of whitespace one space: the console wraps long lines."""
    return " ".join(text.split())


def assert_one_line_error(exit_code: int, stderr: str, *named: str) -> None:
    """Exit status 1 and a single line on stderr that names everything in ``named``."""
    assert exit_code == 1, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    for text in named:
        assert text in stderr, f"{text!r} not in {stderr!r}"


def shard_command(*arguments: str) -> list[str]:
    """A real `eerpipe shard` process."""
    return [sys.executable, "-m", "pipeline.cli", "shard", *arguments, "--no-progress"]


def synthetic_job(out: Path, source: str, subjects_per_shard: int = 10) -> list[str]:
    """A shard process on ``source``, a ``synth:`` corpus, with two workers."""
    return shard_command("--source", source, "--out", str(out), "--subjects-per-shard",
                         str(subjects_per_shard), "--workers", "2")


def run_limited(command: list[str], limit: int, value: int) -> subprocess.CompletedProcess:
    """``command`` in a process under a resource limit (``resource.RLIMIT_*``), for at most a
    minute: a regression then fails the test instead of hanging or exhausting the machine."""
    return subprocess.run(command, preexec_fn=lambda: resource.setrlimit(limit, (value, value)),
                          capture_output=True, text=True, timeout=60)


def wait_until_mid_run(job: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 120
    while not list((out / PENDING).glob("*.tar.json")):
        assert job.poll() is None, job.stderr.read().decode()
        assert time.monotonic() < deadline, "the job never got going"
        time.sleep(0.02)


# --- one job per output ------------------------------------------------------------------------

class ListingWaits(SynthSource):
    """Synthetic subjects whose listing waits for the test: a job stays inside its lock, as a
    job listing a large corpus would, while a second job tries the same output."""

    def __init__(self) -> None:
        super().__init__(60, seed=1)
        self.listing, self.go_on = threading.Event(), threading.Event()

    def open(self) -> tuple[list[str], Counter]:
        self.listing.set()
        assert self.go_on.wait(120), "the test never let the first job go on"
        return super().open()


@contextmanager
def a_first_job_holding(out: str) -> Iterator[Future]:
    """A shard job (seed 1) on ``out`` in a thread, held inside its lock while the block runs."""
    source = ListingWaits()
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(write_shards, source, out, seed=1, subjects_per_shard=10)
        assert source.listing.wait(120), "the first job never took its lock"
        try:
            yield job
        finally:
            source.go_on.set()


def lock_exists(url: str) -> bool:
    if url.startswith("s3://"):
        fs = S3FileSystem()
        fs.invalidate_cache()
        return fs.exists(f"{url[len('s3://'):]}/{LOCK_NAME}")
    return (Path(url) / LOCK_NAME).exists()


def an_output(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh output: a local folder, or a prefix on the moto S3 server."""
    return str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_url")


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_a_second_job_on_the_same_output_is_refused_naming_the_first(
        where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    out = an_output(where, tmp_path, request)
    with a_first_job_holding(out) as first:
        second = shard("--source", "synth:60", "--out", out, "--seed", "2")
    manifest = first.result(timeout=120)

    assert_one_line_error(second.exit_code, second.stderr, out, "locked by another shard job",
                          f"pid {os.getpid()} on {socket.gethostname()}", "--break-lock")
    assert manifest.seed == 1 and len(manifest.subjects) == 60
    report = verify_shards(out)
    assert report.ok and report.subjects == 60, report.problems
    assert not lock_exists(out)


def test_break_lock_never_unlocks_a_job_that_still_runs_on_this_machine(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    with a_first_job_holding(out) as first:
        second = shard("--source", "synth:60", "--out", out, "--seed", "2", "--break-lock")
    assert_one_line_error(second.exit_code, second.stderr, out, "still running on this machine")
    assert first.result(timeout=120).seed == 1 and verify_shards(out).ok


def test_the_lock_of_a_job_on_another_host_is_refused_until_broken(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({  # as a job on another node left it when it died
        "host": "node-7", "pid": 4242, "process": "another-boot/1/4242/99",
        "started": "2026-01-05T08:00:00+00:00", "token": "f" * 32}))
    args = ["--source", "synth:30", "--out", str(out), "--val-subjects", "3",
            "--test-subjects", "3"]

    refused = shard(*args)
    assert_one_line_error(refused.exit_code, refused.stderr, str(out), "pid 4242 on node-7",
                          "--break-lock")
    broken = shard(*args, "--break-lock")

    assert broken.exit_code == 0, broken.output
    assert "removed the lock of pid 4242 on node-7" in flat(broken.stdout)
    assert verify_shards(str(out)).ok and not (out / LOCK_NAME).exists()


# 150 shards: the job still has a second's work when its first shard is published
SIGNALLED_CORPUS = "synth:1500:3"


@pytest.mark.slow  # starts the shard command and signals it mid-job: ~3 s each
@pytest.mark.parametrize(("sig", "lock_left"), [(signal.SIGINT, False), (signal.SIGTERM, False),
                                                (signal.SIGKILL, True)])
def test_a_stopped_job_releases_its_lock_and_a_killed_ones_is_taken_over(
        tmp_path: Path, sig: int, lock_left: bool) -> None:
    out = tmp_path / "out"
    job = subprocess.Popen(synthetic_job(out, SIGNALLED_CORPUS), start_new_session=True, stderr=subprocess.PIPE)
    try:
        wait_until_mid_run(job, out)
        os.kill(job.pid, sig)  # the sharding process only, as Ctrl-C, `kill` or the OOM killer
        assert job.wait(timeout=60) != 0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        job.stderr.close()
    assert (out / LOCK_NAME).exists() == lock_left
    assert not (out / MANIFEST_NAME).exists()

    heard: list[str] = []
    write_shards(SIGNALLED_CORPUS, str(out), subjects_per_shard=10, workers=2, log=heard.append)

    taken_over = [line for line in heard if "removed the lock" in line]
    assert bool(taken_over) == lock_left, heard
    assert all(f"pid {job.pid} " in line and "no longer running" in line for line in taken_over)
    assert verify_shards(str(out)).ok and not (out / LOCK_NAME).exists()


def a_dead_jobs_lock(url: str) -> str:
    """Write the lock of a job that died on this machine, as it would have left it: this boot,
    this pid namespace, a pid that runs no process. Returns its token."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    namespace = os.stat("/proc/self/ns/pid").st_ino
    pid = next(p for p in range(2**15 - 1, 1, -1) if not Path(f"/proc/{p}").exists())
    token = "d" * 32
    fs, root = open_fs(url)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{LOCK_NAME}", json.dumps({
        "host": socket.gethostname(), "pid": pid, "process": f"{boot}/{namespace}/{pid}/1",
        "started": "2026-01-05T08:00:00+00:00", "token": token}).encode())
    return token


def token_of_the_lock(url: str) -> str | None:
    fs, root = open_fs(url)
    try:
        return json.loads(fs.cat_file(f"{root}/{LOCK_NAME}"))["token"]
    except FileNotFoundError:
        return None


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_of_two_jobs_taking_over_the_same_dead_lock_at_once_exactly_one_gets_it(
        where: str, tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = an_output(where, tmp_path, request)
    dead = a_dead_jobs_lock(out)
    both_judged, still_running = threading.Barrier(2, timeout=30), sharding.lock._still_running

    def judge_at_once(holder: dict[str, Any]) -> bool | None:
        """Both jobs find the dead job's lock; the second acts once the first has taken over."""
        if holder.get("token") == dead and both_judged.wait() == 0:
            wait_for(lambda: token_of_the_lock(out) not in (None, dead), "a takeover")
        return still_running(holder)

    monkeypatch.setattr(sharding.lock, "_still_running", judge_at_once)

    def take_the_lock(held: ExitStack) -> OutputLock | OutputLocked:
        fs, root = open_fs(out)
        try:
            return held.enter_context(output_lock(fs, root, out))
        except OutputLocked as refusal:
            return refusal

    with ExitStack() as held, ThreadPoolExecutor(2) as jobs:
        outcomes = list(jobs.map(take_the_lock, [held, held]))
        winners = [lock for lock in outcomes if isinstance(lock, OutputLock)]
        assert len(winners) == 1, outcomes
        assert token_of_the_lock(out) == winners[0].record["token"]
    assert token_of_the_lock(out) is None


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_a_file_replaced_between_the_check_and_the_removal_is_kept(
        where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    fs, root = open_fs(an_output(where, tmp_path, request))
    path = f"{root}/{LOCK_NAME}"
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(path, b"the dead job's")

    def replaced_meanwhile(data: bytes) -> bool:
        fs.pipe_file(path, b"another job's")
        return data == b"the dead job's"

    remove_if(fs, path, replaced_meanwhile)
    assert fs.cat_file(path) == b"another job's"


def test_a_job_whose_lock_was_created_though_the_store_answered_exists_holds_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A create whose reply is lost is retried and refused: NFS answers EEXIST to a retried
    link that the first try made (S3, 412 to a retried conditional upload)."""
    link = os.link

    def link_then_exists(source: str, target: str) -> None:
        link(source, target)
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)

    monkeypatch.setattr(os, "link", link_then_exists)
    out = tmp_path / "out"
    manifest = write_shards("synth:30", str(out), val_subjects=3, test_subjects=3)
    assert len(manifest.subjects) == 30 and not (out / LOCK_NAME).exists()


def the_store_goes_down(out: Path) -> None:
    """From now on every access below ``out`` fails (ENOTDIR): the folder becomes a file."""
    shutil.rmtree(out)
    out.write_text("")


def test_a_job_that_fails_reports_its_own_error_when_the_store_fails_the_release_too(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    fs, root = open_fs(str(out))
    with (pytest.raises(ValueError, match="the job's own error"),
          pytest.warns(UserWarning, match=f"cannot release the lock of {out}: Not a directory")):
        with output_lock(fs, root, str(out)):
            the_store_goes_down(out)
            raise ValueError("the job's own error")


def test_a_job_that_succeeds_fails_if_its_lock_cannot_be_released(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    fs, root = open_fs(str(out))
    with pytest.raises(StorageError, match=f"cannot release the lock of {out}: Not a directory"):
        with output_lock(fs, root, str(out)):
            the_store_goes_down(out)


# --- bounded waits on S3 -----------------------------------------------------------------------

def test_a_commands_first_s3_call_is_one_attempt_of_at_most_10_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """The call that names a wrong endpoint before any work starts, with the default settings."""
    monkeypatch.delenv(READ_TIMEOUT_ENV, raising=False)
    probe = _probing_fs("s3://any-bucket/set", {})
    assert probe.config_kwargs["read_timeout"] == PROBE_READ_TIMEOUT_S == 10
    assert probe.config_kwargs["retries"]["total_max_attempts"] == 1 and probe.retries == 1


@pytest.mark.slow  # waits out the S3 client's read timeout, set to 1 s here
@pytest.mark.timeout(120)  # a regression hangs: fail it rather than wait for the suite's limit
@pytest.mark.parametrize("command", [["shard", "--source", "synth:10", "--no-progress", "--out"],
                                     ["shards", "verify"]])
def test_an_s3_endpoint_that_never_answers_fails_in_seconds_naming_it(
        command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true"),
                        (READ_TIMEOUT_ENV, "1")):
        monkeypatch.setenv(name, value)
    url = "s3://silent-bucket/set"
    with server_that_never_answers(lifetime_s=90) as endpoint:
        started = time.monotonic()
        result = runner.invoke(app, [*command, url, "--endpoint-url", endpoint])
        elapsed = time.monotonic() - started
    assert_one_line_error(result.exit_code, result.stderr, url, endpoint.removeprefix("http://"),
                          "timeout")
    assert elapsed < 5  # one wait of 1 s, where the 3 × 2 attempts of a call mid-job would take 6 s


def test_a_bad_s3_timeout_setting_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(READ_TIMEOUT_ENV, "soon")
    result = shard("--source", "synth:10", "--out", "s3://any-bucket/set")
    assert_one_line_error(result.exit_code, result.stderr, f"{READ_TIMEOUT_ENV}='soon'",
                          "positive number of seconds")


# --- inputs that would hang or flood the reader ------------------------------------------------

HEADER = ("PARTICIPANT_ID\tTEST_SECTION_ID\tSENTENCE\tUSER_INPUT\tKEYSTROKE_ID\tPRESS_TIME\t"
          "RELEASE_TIME\tLETTER\tKEYCODE\n")


def sentence(section: int, keys: int = 5) -> np.ndarray:
    """``[press, release, keycode]`` of a sentence's keys, as :func:`keystroke_row` writes them."""
    press = 1_470_000_000_000 + section * 1_000_000 + 150 * np.arange(keys)
    return np.stack([press, press + 90, np.full(keys, 65)], axis=1).astype(np.float64)


def keystroke_row(participant: str, section: int, key: int, letter: str = "a",
                  code: int = 65) -> str:
    press, release, _ = sentence(section, key + 1)[key].astype(np.int64)
    return (f"{participant}\t{section}\tHi there.\tHi there.\t{key}\t{press}\t{release}"
            f"\t{letter}\t{code}\n")


def aalto_file(folder: Path, participant: str, sections: int = 3, bad: str = "") -> Path:
    """A participant file of ``sections`` sentences of 5 keys; ``bad`` is appended as is."""
    rows = [keystroke_row(participant, s, k) for s in range(sections) for k in range(5)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{participant}_keystrokes.txt"
    path.write_text(HEADER + "".join(rows) + bad)
    return path


def aalto_corpus(folder: Path, participants: range = range(10, 16)) -> Path:
    for participant in participants:
        aalto_file(folder, str(participant))
    return folder


def sharding_args(raw: Path, out: Path) -> list[str]:
    return ["--source", f"aalto-desktop:{raw}", "--out", str(out), "--val-subjects", "1",
            "--test-subjects", "1"]


def fifo(path: Path) -> None:
    os.mkfifo(path)


def link_to_dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def larger_than_the_cap(path: Path) -> None:
    with open(path, "wb") as stream:  # sparse: no disk space used
        stream.truncate(MAX_PARTICIPANT_FILE_BYTES + 1)


@pytest.mark.parametrize(("make", "kind"), [(fifo, "a named pipe, not a regular file"),
                                            (link_to_dev_zero, "a character device"),
                                            (larger_than_the_cap, "bytes, more than the")])
def test_an_aalto_file_that_would_hang_or_flood_the_reader_is_refused_naming_it(
        tmp_path: Path, make, kind: str) -> None:
    raw = aalto_corpus(tmp_path / "raw")
    make(raw / "99_keystrokes.txt")
    job = run_limited(shard_command(*sharding_args(raw, tmp_path / "out"), "--workers", "1"),
                      resource.RLIMIT_AS, 2 * 2**30)
    assert_one_line_error(job.returncode, job.stderr, "99_keystrokes.txt", kind, "--participants")
    assert not (tmp_path / "out").exists()


def test_a_symlink_to_a_regular_file_is_read_wherever_it_points(tmp_path: Path) -> None:
    raw = aalto_corpus(tmp_path / "raw")
    elsewhere = aalto_file(tmp_path / "download", "77")
    (raw / "77_keystrokes.txt").symlink_to(elsewhere)
    assert shard(*sharding_args(raw, tmp_path / "out")).exit_code == 0
    assert "77" in load_manifest(str(tmp_path / "out")).subjects


# --- an unreadable source ---------------------------------------------------------------------

class ReadsAFolder(SynthSource):
    """A source whose subjects' file is a folder: reading it fails (EISDIR), for root too."""

    def __init__(self, folder: Path) -> None:
        super().__init__(30, seed=1)
        self.folder = folder

    def load(self, subject_id: str) -> Any:
        return np.load(self.folder)


def test_a_source_that_cannot_be_read_is_named_with_its_file_not_taken_for_the_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unreadable = tmp_path / "subjects.npy"
    unreadable.mkdir()
    source = ReadsAFolder(unreadable)
    monkeypatch.setattr("sharding.source_spec.parse_source", lambda spec, participants=None: source)
    result = shard("--source", "synth:30:1", "--out", str(tmp_path / "out"))
    assert_one_line_error(result.exit_code, result.stderr, "cannot read the source synth:30:1",
                          f"Is a directory (EISDIR): {unreadable}")
    assert "storage" not in result.stderr


# --- a full disk -------------------------------------------------------------------------------

def assert_nothing_corrupt(out: Path) -> None:
    """No manifest, no temporary, and every published shard matches its record."""
    assert not (out / MANIFEST_NAME).exists()
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]
    for record in (out / PENDING).glob("*.tar.json"):
        info = json.loads(record.read_text())["shard"]
        assert hashlib.sha256((out / info["name"]).read_bytes()).hexdigest() == info["sha256"]


def test_a_file_size_limit_mid_job_is_one_line_and_a_rerun_finishes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # 150 kB per file hold the lock and the plan, not a shard of 20 subjects: its write fails (EFBIG)
    job = run_limited(synthetic_job(out, "synth:300:3", subjects_per_shard=20), resource.RLIMIT_FSIZE, 150_000)
    assert_one_line_error(job.returncode, job.stderr, str(out), "File too large (EFBIG)",
                          "re-run the same command to resume")
    assert_nothing_corrupt(out)

    write_shards("synth:300:3", str(out), subjects_per_shard=20, workers=2)
    assert verify_shards(str(out)).ok


def test_a_full_disk_mid_job_is_one_line_and_a_rerun_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real full disk cannot be made safely here: the disk fills at the fifth fsync (the
    lock, the plan, a shard and its record went through), where delayed allocation reports it."""
    out = tmp_path / "out"
    real_fsync, calls = os.fsync, []

    def fsync_until_full(fd: int) -> None:
        calls.append(fd)
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_until_full)
    args = ["--source", "synth:60:2", "--out", str(out), "--subjects-per-shard", "10"]
    full = shard(*args)
    assert_one_line_error(full.exit_code, full.stderr, str(out / "train-000001.tar"),
                          "No space left on device (ENOSPC)", "re-run the same command to resume")
    assert_nothing_corrupt(out)
    assert (out / "train-000000.tar").exists() and not (out / "train-000001.tar").exists()

    monkeypatch.setattr(os, "fsync", real_fsync)
    assert shard(*args).exit_code == 0
    assert verify_shards(str(out)).ok


# --- malformed Aalto rows ----------------------------------------------------------------------

def test_a_malformed_aalto_row_drops_only_its_sentence_and_is_counted(tmp_path: Path) -> None:
    raw = aalto_corpus(tmp_path / "raw")
    tab = keystroke_row("70", 5, 0, letter="\t", code=9)  # a field holding a tab: 10 fields
    enter = keystroke_row("71", 5, 0, letter="\n", code=13)  # a line break: 8 fields, then 2
    aalto_file(raw, "70", sections=5, bad=tab + keystroke_row("70", 5, 1))
    aalto_file(raw, "71", sections=5, bad=enter + keystroke_row("71", 5, 1))
    out = tmp_path / "out"

    result = shard(*sharding_args(raw, out))

    assert result.exit_code == 0, result.output
    manifest = load_manifest(str(out))
    assert manifest.rejected == {"session:malformed_rows": 2}
    assert json.loads((out / REJECTS_NAME).read_text())["counts"] == manifest.rejected
    for participant in ("70", "71"):
        [subject] = [s for s in read_shard(str(out), manifest.subjects[participant])
                     if s.subject_id == participant]
        assert subject.session_ids == ["0", "1", "2", "3", "4"]  # sentence 5 dropped, the rest kept
        for section, keys in enumerate(subject.sessions):
            np.testing.assert_array_equal(keys, sentence(section))
