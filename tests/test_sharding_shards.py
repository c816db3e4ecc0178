"""The shard writer: lossless, deterministic, atomic, resumable; verify and stats; S3."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from s3fs import S3FileSystem
from typer.testing import CliRunner

from pipeline.cli import app
from sharding.format import MANIFEST_NAME, SPLITS, load_manifest
from sharding.kvc import read_dev_set
from sharding.output import PENDING, REJECTS_NAME
from sharding.plan import FORMER_MAX_SUBJECTS_PER_SHARD, ShardingError, plan_shards
from sharding.storage import StorageError
from sharding.synth import SynthCorpus, write_kvc
from sharding.verify import read_shard, shard_stats, verify_shards
from sharding.writer import write_shards

runner = CliRunner()


def all_subjects(url: str, **options) -> dict:
    manifest = load_manifest(url, **options)
    return {s.subject_id: s for info in manifest.shards for s in read_shard(url, info.name, **options)}


def assert_lossless(url: str, corpus: SynthCorpus, n: int, **options) -> None:
    subjects = all_subjects(url, **options)
    assert len(subjects) == n
    for i in range(n):
        want = corpus.subject(i)
        got = subjects[corpus.subject_id(i)]
        assert got.session_ids == list(want)
        for array, expected in zip(got.sessions, want.values()):
            assert array.dtype == np.float64
            np.testing.assert_array_equal(array, expected)  # exact, epoch-ms times included


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished shard set of 60 synthetic subjects, 7 per shard (read-only for tests)."""
    out = tmp_path_factory.mktemp("finished")
    write_shards("synth:60:5", str(out), subjects_per_shard=7, val_subjects=6, test_subjects=9)
    return out


def test_shards_round_trip_losslessly(finished: Path) -> None:
    assert_lossless(str(finished), SynthCorpus(seed=5), 60)


def test_splits_are_disjoint_sized_and_named(finished: Path) -> None:
    manifest = load_manifest(str(finished))
    per_split = {split: [s for s in manifest.shards if s.split == split] for split in SPLITS}
    assert {k: sum(s.samples for s in v) for k, v in per_split.items()} == {
        "train": 45, "val": 6, "test": 9}
    assert [s.name for s in per_split["train"]] == [f"train-{i:06d}.tar" for i in range(7)]
    assert [s.samples for s in per_split["train"]] == [7] * 6 + [3]
    assert len(manifest.subjects) == 60  # one shard, hence one split, per subject
    assert sorted(p.name for p in finished.iterdir()) == sorted(
        [MANIFEST_NAME, REJECTS_NAME, *(s.name for s in manifest.shards)])
    assert manifest.source["kind"] == "synth" and manifest.rejected == {}


def test_plan_is_a_pure_function_of_subjects_seed_and_shard_size() -> None:
    ids = [f"{i:08x}" for i in range(100)]
    plan = plan_shards(ids, seed=1, subjects_per_shard=8, val_subjects=10, test_subjects=10)
    assert plan == plan_shards(ids[::-1], seed=1, subjects_per_shard=8, val_subjects=10,
                               test_subjects=10)
    assert plan != plan_shards(ids, seed=2, subjects_per_shard=8, val_subjects=10, test_subjects=10)
    assert sorted(s for shard in plan for s in shard.subjects) == ids
    with pytest.raises(ShardingError, match="no training subjects"):
        plan_shards(ids, seed=1, subjects_per_shard=8, val_subjects=50, test_subjects=50)


def test_same_job_writes_identical_bytes_with_any_worker_count(finished: Path, tmp_path: Path) -> None:
    write_shards("synth:60:5", str(tmp_path), subjects_per_shard=7, val_subjects=6,
                 test_subjects=9, workers=2)
    assert (tmp_path / MANIFEST_NAME).read_text() == (finished / MANIFEST_NAME).read_text()


def test_kvc_files_shard_exactly_like_the_synth_source(tmp_path: Path) -> None:
    write_kvc(tmp_path / "data", subjects=30, test_subjects=3, seed=2)
    from_files = write_shards(f"kvc:{tmp_path / 'data'}:desktop", str(tmp_path / "a"),
                              subjects_per_shard=10)
    in_memory = write_shards("synth:30:2", str(tmp_path / "b"), subjects_per_shard=10)
    assert [s.sha256 for s in from_files.shards] == [s.sha256 for s in in_memory.shards]


def test_rerunning_a_finished_job_changes_nothing(finished: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in finished.iterdir()}
    manifest = write_shards("synth:60:5", str(finished), subjects_per_shard=7, val_subjects=6,
                            test_subjects=9)
    assert manifest == load_manifest(str(finished))
    assert {p.name: p.stat().st_mtime_ns for p in finished.iterdir()} == before


def test_a_different_job_never_overwrites_a_shard_set(finished: Path) -> None:
    with pytest.raises(ShardingError, match="already holds a different shard set"):
        write_shards("synth:60:6", str(finished), subjects_per_shard=7, val_subjects=6,
                     test_subjects=9)


def test_an_unfinished_job_with_another_plan_is_not_mixed_in(tmp_path: Path) -> None:
    (tmp_path / PENDING).mkdir()
    (tmp_path / PENDING / "plan.json").write_text(json.dumps({"source": {"kind": "x"}, "seed": 1,
                                                             "shards": []}))
    with pytest.raises(ShardingError, match="unfinished job with another plan"):
        write_shards("synth:20", str(tmp_path), subjects_per_shard=5)
    assert not list(tmp_path.glob("*.tar"))


def test_resume_after_sigkill_completes_keeping_verified_shards(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline.cli", "shard", "--source", "synth:600:3",
               "--out", str(out), "--subjects-per-shard", "20", "--workers", "2", "--no-progress"]
    job = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list((out / PENDING).glob("*.tar.json"))) < 4:
        assert job.poll() is None, job.stderr.read().decode()
        assert time.monotonic() < deadline, "the job never got going"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # the whole process group: a node going down
    job.wait()
    assert not (out / MANIFEST_NAME).exists()

    records = {p.name[: -len(".json")]: json.loads(p.read_text())
               for p in (out / PENDING).glob("*.tar.json")}
    kept, corrupted = sorted(records)[:-1], sorted(records)[-1]
    kept_inodes = {name: (out / name).stat().st_ino for name in kept}
    (out / corrupted).write_bytes((out / corrupted).read_bytes()[:-600])  # bad checksum now
    (out / ".train-000020.tar.999.tmp").write_bytes(b"half a shard")  # left by a dead writer

    manifest = write_shards("synth:600:3", str(out), subjects_per_shard=20, workers=2)

    assert {name: (out / name).stat().st_ino for name in kept} == kept_inodes
    by_name = {s.name: s for s in manifest.shards}
    assert by_name[corrupted].sha256 == records[corrupted]["shard"]["sha256"]  # rewritten
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME, REJECTS_NAME, *by_name])
    report = verify_shards(str(out))
    assert report.ok and report.subjects == 600, report.problems


def test_verify_catches_corrupted_missing_and_miscounted_shards(finished: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in finished.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    data = bytearray((broken / "train-000001.tar").read_bytes())
    data[5000] ^= 0xFF
    (broken / "train-000001.tar").write_bytes(bytes(data))
    (broken / "val-000000.tar").unlink()
    tar = (broken / "train-000003.tar").read_bytes()
    (broken / "train-000003.tar").write_bytes(tar[: len(tar) // 2])

    report = verify_shards(str(broken))
    problems = "\n".join(report.problems)
    assert "train-000001.tar: sha256 differs" in problems
    assert "val-000000.tar: missing" in problems
    assert "train-000003.tar:" in problems and "subjects of the manifest are in no shard" in problems
    result = runner.invoke(app, ["shards", "verify", str(broken)])
    assert result.exit_code == 1
    assert runner.invoke(app, ["shards", "verify", str(finished)]).exit_code == 0


def test_stats_count_subjects_sessions_and_keys_per_split(finished: Path) -> None:
    stats = shard_stats(str(finished))
    corpus = SynthCorpus(seed=5)
    assert sum(row["subjects"] for row in stats["splits"].values()) == 60
    assert sum(row["sessions"] for row in stats["splits"].values()) == 60 * 15
    assert sum(row["keys"] for row in stats["splits"].values()) == sum(
        len(a) for i in range(60) for a in corpus.subject(i).values())
    result = runner.invoke(app, ["shards", "stats", str(finished), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["shard_bytes"]["count"] == 10


def test_malicious_kvc_file_stops_the_cli_before_writing_anything(tmp_path: Path) -> None:
    (tmp_path / "desktop").mkdir()
    with open(tmp_path / "desktop" / "desktop_dev_set.npy", "wb") as stream:
        np.save(stream, {"u": {"s": os.getcwd}}, allow_pickle=True)  # pickled by reference
    result = runner.invoke(app, ["shard", "--source", f"kvc:{tmp_path}", "--out",
                                 str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 1
    assert "desktop_dev_set.npy" in result.stderr and "refused" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_s3_write_verify_read_back_and_rerun(s3_url: str) -> None:
    manifest = write_shards("synth:40:9", s3_url, subjects_per_shard=9, workers=2)
    assert verify_shards(s3_url).ok
    assert_lossless(s3_url, SynthCorpus(seed=9), 40)
    assert write_shards("synth:40:9", s3_url, subjects_per_shard=9) == manifest
    assert "endpoint" not in json.dumps(manifest.source) and "testing" not in manifest.to_json()
    result = runner.invoke(app, ["shards", "verify", s3_url])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_rerunning_on_s3_rewrites_a_deleted_shard_and_nothing_else(s3_url: str) -> None:
    manifest = write_shards("synth:30:9", s3_url, val_subjects=3, test_subjects=3)
    fs = S3FileSystem()
    root = s3_url[len("s3://"):]
    before = {info["name"]: info["LastModified"] for info in fs.ls(root, detail=True)}
    victim = f"{root}/train-000003.tar"
    fs.rm_file(victim)
    fs.invalidate_cache()
    heard: list[str] = []
    assert write_shards("synth:30:9", s3_url, val_subjects=3, test_subjects=3,
                        log=heard.append) == manifest
    fs.invalidate_cache()
    after = {info["name"]: info["LastModified"] for info in fs.ls(root, detail=True)}
    assert after.keys() == before.keys()
    assert {n: t for n, t in after.items() if n != victim} == {
        n: t for n, t in before.items() if n != victim}
    assert heard == [f"{s3_url}: rewrote 1 missing or corrupt shard (train-000003.tar)"]
    assert verify_shards(s3_url).ok


@pytest.mark.slow
def test_unusable_storage_fails_before_any_work(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot use storage"):
        write_shards("synth:10", "s3://eerpipe-test/x",
                     storage_options={"endpoint_url": "http://127.0.0.1:9", "skip_instance_cache": True,
                                      "config_kwargs": {"retries": {"max_attempts": 1}}})
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    S3FileSystem.clear_instance_cache()  # as in a fresh process: credentials are looked up anew
    try:
        result = runner.invoke(app, ["shard", "--source", "synth:10", "--out", "s3://eerpipe-test/y",
                                     "--no-progress"])
    finally:
        S3FileSystem.clear_instance_cache()  # later tests must not reuse the credential-less client
    assert result.exit_code == 1 and "credentials" in result.stderr


# --- shard size ------------------------------------------------------------------------------

def test_default_shard_size_gives_every_split_enough_shards_for_a_small_corpus() -> None:
    ids = [f"{i:05d}" for i in range(1010)]  # train under 8 × 128: the minimum counts decide
    plan = plan_shards(ids, seed=0, val_subjects=101, test_subjects=101)
    sizes = {split: [len(s.subjects) for s in plan if s.split == split] for split in SPLITS}
    assert {split: len(v) for split, v in sizes.items()} == {"train": 8, "val": 2, "test": 2}
    assert {split: sum(v) for split, v in sizes.items()} == {"train": 808, "val": 101, "test": 101}
    assert all(max(v) - min(v) <= 1 for v in sizes.values())  # near-equal: balanced readers


def test_default_shard_size_never_exceeds_128_subjects_on_a_large_corpus() -> None:
    ids = [f"{i:06d}" for i in range(25_000)]  # 25,000 − 1,000 val − 1,000 test = 23,000 train
    plan = plan_shards(ids, seed=0)
    train = [len(s.subjects) for s in plan if s.split == "train"]
    assert len(train) == 180 and max(train) == 128 and max(train) - min(train) <= 1
    assert max(len(s.subjects) for s in plan) <= 128


def test_the_former_cap_replans_a_set_written_before_the_cap_changed() -> None:
    ids = [f"{i:06d}" for i in range(25_000)]
    plan = plan_shards(ids, seed=0, max_subjects_per_shard=FORMER_MAX_SUBJECTS_PER_SHARD)
    assert [len(s.subjects) for s in plan if s.split == "train"] == [1000] * 23
    assert [len(s.subjects) for s in plan if s.split != "train"] == [500] * 4  # 2 val + 2 test


def test_a_set_planned_under_the_former_automatic_cap_is_resumed_with_it_and_a_new_one_with_today_s() -> None:
    """A pending set's record names no cap when it was planned before the cap was recorded."""
    from sharding.writer import _adopt, _plan

    ids = [f"{i:06d}" for i in range(5_000)]
    sharding = {"subjects_per_shard": None, "val_subjects": None, "test_subjects": None}
    requested = {"name": "synth", "sharding": {**sharding, "max_subjects_per_shard": 128}}
    former = {"name": "synth", "sharding": sharding}
    assert _adopt(former, requested) == former
    assert _plan(ids, former, 0) == plan_shards(ids, seed=0, max_subjects_per_shard=FORMER_MAX_SUBJECTS_PER_SHARD)
    assert _adopt(requested, requested) == requested
    assert _plan(ids, requested, 0) == plan_shards(ids, seed=0)


def test_a_tiny_corpus_gets_one_subject_per_shard_rather_than_too_few_shards() -> None:
    plan = plan_shards([f"{i}" for i in range(7)], seed=0, val_subjects=1, test_subjects=1)
    assert [len(s.subjects) for s in plan if s.split == "train"] == [1] * 5


def test_a_small_corpus_sharded_with_defaults_feeds_two_ranks_of_four_loader_workers(
        tmp_path: Path) -> None:
    from pipeline.data.stream import Plan

    manifest = write_shards("synth:50:1", str(tmp_path))
    readers = Plan.make(manifest.shards_of("train"), world_size=2, num_workers=4,
                        subjects_per_batch=4, seed=0)
    assert readers.batches_per_epoch >= 1
    assert manifest.source["sharding"]["subjects_per_shard"] is None  # recorded as automatic


def test_rerunning_with_automatic_size_keeps_a_set_written_with_the_old_default(
        finished: Path, tmp_path: Path) -> None:
    old = write_shards("synth:30:2", str(tmp_path), subjects_per_shard=1000)  # the old default
    assert write_shards("synth:30:2", str(tmp_path)) == old


# --- re-running repairs ----------------------------------------------------------------------

def _fresh_set(tmp_path: Path) -> tuple[Path, list[str]]:
    out = tmp_path / "set"
    args = ["shard", "--source", "synth:60:5", "--out", str(out), "--val-subjects", "6",
            "--test-subjects", "9", "--workers", "1", "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    return out, args


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_rerunning_the_shard_command_rewrites_exactly_the_missing_and_corrupt_shards(
        tmp_path: Path) -> None:
    out, args = _fresh_set(tmp_path)
    manifest = load_manifest(str(out))
    missing, corrupt = "train-000002.tar", "val-000001.tar"
    (out / missing).unlink()
    data = bytearray((out / corrupt).read_bytes())
    data[3000] ^= 0xFF
    (out / corrupt).write_bytes(bytes(data))
    before = _stamps(out)

    result = runner.invoke(app, args)

    assert result.exit_code == 0, result.output
    after = _stamps(out)
    assert {n for n in after if after[n] != before.get(n)} == {missing, corrupt}
    assert load_manifest(str(out)) == manifest
    assert verify_shards(str(out)).ok


def test_verify_names_the_exact_command_that_repairs_the_set(tmp_path: Path) -> None:
    out, _ = _fresh_set(tmp_path)
    (out / "test-000000.tar").unlink()
    result = runner.invoke(app, ["shards", "verify", str(out)])
    assert result.exit_code == 1 and "test-000000.tar: missing" in result.stderr
    command = result.stderr.split("rewrites exactly the bad shards): ", 1)[1].strip()
    words = shlex.split(command.replace("\n", " "))
    assert words[:2] == ["eerpipe", "shard"] and "--out" in words

    assert runner.invoke(app, [*words[1:], "--no-progress"]).exit_code == 0
    assert runner.invoke(app, ["shards", "verify", str(out)]).exit_code == 0


def test_a_repair_that_would_publish_different_bytes_is_refused(tmp_path: Path) -> None:
    write_kvc(tmp_path / "data", subjects=12, test_subjects=2, seed=3)
    spec = f"kvc:{tmp_path / 'data'}:desktop"
    manifest = write_shards(spec, str(tmp_path / "out"), val_subjects=2, test_subjects=2)
    corpus = tmp_path / "data" / "desktop" / "desktop_dev_set.npy"
    edited = {user: {f"x{k}": v for k, v in sessions.items()}  # same subjects, other session ids
              for user, sessions in read_dev_set(corpus)}
    np.save(corpus, edited, allow_pickle=True)
    victim = manifest.shards_of("train")[0].name
    (tmp_path / "out" / victim).unlink()
    with pytest.raises(ShardingError, match="cannot repair"):
        write_shards(spec, str(tmp_path / "out"), val_subjects=2, test_subjects=2)
    assert not (tmp_path / "out" / victim).exists()


# --- workers die with the job ----------------------------------------------------------------

@pytest.mark.slow  # starts the shard command and signals it mid-job: ~3 s each
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_shard_command_ends_its_worker_processes(tmp_path: Path, sig: int) -> None:
    import psutil

    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline.cli", "shard", "--source", "synth:3000:3",
               "--out", str(out), "--subjects-per-shard", "10", "--workers", "2", "--no-progress"]
    job = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not list((out / PENDING).glob("*.tar.json")):  # mid-run: shards are being written
            assert job.poll() is None, job.stderr.read().decode()
            assert time.monotonic() < deadline, "the job never got going"
            time.sleep(0.02)
        workers = psutil.Process(job.pid).children(recursive=True)
        assert len(workers) >= 2
        os.kill(job.pid, sig)  # the parent only, as an OOM killer or `kill` would
        job.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive, f"workers outlived the job: {alive}"
    finally:
        for process in [*workers, psutil.Process(job.pid)] if job.poll() is None else workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()  # a failing run must not leave orphans behind
        job.wait()
        job.stderr.close()


# --- options are checked before anything is created -------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    (["--workers", "0"], "--workers"),
    (["--workers", "-3"], "--workers"),
    (["--val-subjects", "-5"], "--val-subjects"),
    (["--test-subjects", "-1"], "--test-subjects"),
    (["--subjects-per-shard", "0"], "--subjects-per-shard"),
    (["--split", "holdout"], "--split"),
])
def test_impossible_options_are_refused_naming_the_option_and_create_nothing(
        tmp_path: Path, options: list[str], message: str) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", "--source", "synth:20", "--out", str(out),
                                 "--no-progress", *options])
    assert result.exit_code == 2 and message in result.stderr
    assert "no training subjects" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"workers": 0}, "--workers must be at least 1, got 0"),
    ({"val_subjects": -5}, "--val-subjects must be at least 0, got -5"),
    ({"split": "test", "val_subjects": 2}, "cannot be combined"),
    ({"val_subjects": 10, "test_subjects": 10}, "no training subjects would be left"),
])
def test_a_refused_job_leaves_no_output_folder_behind(tmp_path: Path, kwargs: dict,
                                                      message: str) -> None:
    with pytest.raises(ShardingError, match=message):
        write_shards("synth:20", str(tmp_path / "a" / "b"), **kwargs)
    assert not (tmp_path / "a").exists()


# --- evaluation-only sets --------------------------------------------------------------------

def test_split_test_puts_every_subject_in_the_test_split(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = runner.invoke(app, ["shard", "--source", "synth:30:4", "--out", str(out),
                                 "--split", "test", "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(str(out))
    assert {s.split for s in manifest.shards} == {"test"} and len(manifest.shards) == 2
    assert len(manifest.subjects) == 30 and manifest.source["sharding"]["split"] == "test"
    assert verify_shards(str(out)).ok
    assert_lossless(str(out), SynthCorpus(seed=4), 30)
