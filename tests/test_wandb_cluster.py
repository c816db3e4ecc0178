"""W&B on clusters: a relaunch loses no metric, a run without a W&B login says where its offline
files go and keeps them in its storage (S3 too), and online mode without a login is refused.

W&B runs offline here; S3 is the moto server of ``tests/conftest.py``. No Ray cluster starts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import TrainConfig
from pipeline.metrics.verification import Roc, validate
from pipeline.training.metrics_sink import MetricsSink
from pipeline.training.wandb_run import FolderMirror, check_wandb
from sharding.storage import open_fs
from tests.wandb_offline import history, last_step, metric_axes, resume_as_online

API_KEY = "0" * 40  # a well-formed key that is never sent anywhere: no test goes online
SERVER = "https://wandb.eerpipe.test"


@pytest.fixture
def no_login(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No W&B credentials anywhere wandb looks; returns the (absent) netrc file's path."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", SERVER)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def config_of(storage: str, name: str, *overrides: str) -> TrainConfig:
    return TrainConfig.load(None, [f"run.storage={storage}", f"run.name={name}", *overrides])


def metrics(step: int) -> dict[str, float]:
    """A logged step's row as the worker passes it, with a few dozen training metrics."""
    return {"step": step, "epoch": 0, "total_steps": 100, "train/loss": 1 / step,
            **{f"train/metric_{index:02d}": step + index / 100 for index in range(24)}}


def launch(config: TrainConfig, steps: Iterable[int]) -> None:
    """One launch of the run's rank 0 that logs ``steps``."""
    sink = MetricsSink(config, rank=0)
    for step in steps:
        sink.log(metrics(step), step)
    sink.finish()


def logged_steps(log: Path) -> list[int]:
    return [row["step"] for row in history(log) if "train/loss" in row]


def download(url: str, local: Path) -> Path:
    fs, root = open_fs(url)
    for path in fs.find(root):
        target = local / path[len(root) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fs.cat_file(path))
    return local


def wait_until_w_and_b_wrote_a_block(folder: Path) -> None:
    """W&B writes its transaction log in 32 KiB blocks, a little after ``log`` returns."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(log.stat().st_size > 32768 for log in folder.glob("offline-run-*/run-*.wandb")):
            return
        time.sleep(0.05)
    raise AssertionError(f"W&B wrote no block of its log in {folder} within 30 s")


def test_a_relaunch_logs_every_step_since_its_checkpoint_though_w_and_b_had_logged_past_it(tmp_path, monkeypatch):
    config = config_of(str(tmp_path), "relaunched", "wandb.mode=offline")
    folder = Path(config.run_dir, "wandb")
    launch(config, range(1, 11))  # dies after step 10; its last checkpoint was at step 5
    (first,) = folder.glob("offline-run-*/run-*.wandb")
    resume_as_online(monkeypatch, after_step=last_step(first))
    launch(config, range(6, 13))  # the relaunch resumes from step 5's checkpoint
    (relaunch,) = set(folder.glob("offline-run-*/run-*.wandb")) - {first}
    assert logged_steps(relaunch) == list(range(6, 13))


def test_every_metric_and_the_det_plot_are_logged_against_the_training_step(tmp_path):
    config = config_of(str(tmp_path), "axes", "wandb.mode=offline")
    sink = MetricsSink(config, rank=0)
    sink.log(metrics(2), 2)
    truth = np.array([1, 1, 0, 0, 0])
    sink.log(metrics(4) | {"val/eer": 0.25}, 4, det=Roc.of(*validate(truth, np.array([0.9, 0.4, 0.5, 0.1, 0.2]))))
    sink.finish()
    (log,) = Path(config.run_dir, "wandb").glob("offline-run-*/run-*.wandb")
    assert metric_axes(log)["*"] == "step" and set(metric_axes(log).values()) == {"step"}
    validation = [row for row in history(log) if "val/eer" in row]
    assert [(row["step"], row["val/det/_type"]) for row in validation] == [(4, "image-file")]
    assert "total_steps" not in set().union(*history(log))


def test_a_run_on_s3_without_a_login_logs_offline_into_its_storage_at_each_checkpoint_and_at_the_end(
    s3_url, tmp_path, monkeypatch, no_login
):
    monkeypatch.setattr("ray.train.report", lambda metrics, checkpoint=None: None)  # no Ray Train session here
    config = config_of(s3_url, "on-s3")  # wandb.mode: auto
    stored = f"{config.run_dir}/wandb"
    sink = MetricsSink(config, rank=0)
    for step in range(1, 41):  # more than W&B's first 32 KiB block
        sink.log(metrics(step), step)
    wait_until_w_and_b_wrote_a_block(sink.wandb.mirror.local)
    sink.publish(metrics(40), checkpoint=object())
    (at_checkpoint,) = download(stored, tmp_path / "checkpoint").glob("offline-run-*/run-*.wandb")
    assert logged_steps(at_checkpoint) == list(range(1, len(logged_steps(at_checkpoint)) + 1))
    assert logged_steps(at_checkpoint)  # and a pod's death would lose only the rows after them
    for step in range(41, 45):
        sink.log(metrics(step), step)
    sink.finish()
    (at_end,) = download(stored, tmp_path / "end").glob("offline-run-*/run-*.wandb")
    assert logged_steps(at_end) == list(range(1, 45))
    assert not sink.wandb.init_dir.exists()  # nothing left behind in the pod


def test_a_folder_mirror_copies_new_and_changed_files_whole_and_skips_unchanged_files_and_links(s3_url, tmp_path):
    local = tmp_path / "wandb"
    (local / "run").mkdir(parents=True)
    (local / "run" / "run.wandb").write_bytes(b"block 1")
    (local / "run" / "config.yaml").write_text("a: 1")
    (local / "latest-run").symlink_to(local / "run")
    mirror = FolderMirror(local, s3_url)
    mirror.copy_changed()
    fs, root = open_fs(s3_url)
    assert sorted(path[len(root) + 1 :] for path in fs.find(root)) == ["run/config.yaml", "run/run.wandb"]
    (local / "run" / "run.wandb").write_bytes(b"block 1 block 2")
    fs.rm_file(f"{root}/run/config.yaml")  # an unchanged file is not copied again
    mirror.copy_changed()
    assert fs.cat_file(f"{root}/run/run.wandb") == b"block 1 block 2"
    assert not fs.exists(f"{root}/run/config.yaml")


def test_online_mode_without_a_w_and_b_login_is_refused_in_one_line_naming_the_setting(tmp_path, no_login):
    with pytest.raises(ValueError, match=r"^wandb.mode=online needs a W&B login: set WANDB_API_KEY [^\n]*$"):
        check_wandb(config_of(str(tmp_path), "online", "wandb.mode=online"))


@pytest.mark.parametrize("login", ["api key", "netrc"])
def test_online_mode_with_an_api_key_or_a_netrc_login_is_accepted_without_a_notice(tmp_path, monkeypatch, no_login,
                                                                                   login):
    if login == "api key":
        monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    else:
        no_login.write_text(f"machine {SERVER.removeprefix('https://')}\n  login user\n  password {API_KEY}\n")
    assert check_wandb(config_of(str(tmp_path), "online", "wandb.mode=online")) is None


def test_auto_mode_without_a_login_warns_in_one_line_that_the_run_logs_offline_into_its_folder_and_how_to_sync(
    tmp_path, no_login
):
    config = config_of(str(tmp_path), "local")
    notice = check_wandb(config)
    assert notice is not None and "\n" not in notice
    assert "wandb.mode=auto logs this run offline" in notice
    assert notice.endswith(f"upload it later with `wandb sync {tmp_path}/local/wandb`")


def test_auto_mode_without_a_login_on_s3_names_the_storage_folder_and_how_to_fetch_and_sync_it(no_login):
    notice = check_wandb(config_of("s3://bucket/runs", "remote"))
    assert notice is not None and "\n" not in notice
    assert "offline to s3://bucket/runs/remote/wandb;" in notice
    assert "`aws s3 cp --recursive s3://bucket/runs/remote/wandb wandb-remote`" in notice
    assert notice.endswith("then `wandb sync wandb-remote`")


@pytest.mark.parametrize("override", ["wandb.enabled=false", "wandb.mode=disabled", "wandb.mode=offline"])
def test_a_run_that_chose_offline_or_no_w_and_b_needs_no_notice(tmp_path, no_login, override):
    assert check_wandb(config_of(str(tmp_path), "quiet", override)) is None


def test_auto_mode_with_a_login_needs_no_notice(tmp_path, monkeypatch, no_login):
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    assert check_wandb(config_of(str(tmp_path), "logged-in")) is None
