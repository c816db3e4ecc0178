"""Distributed training on a real local Ray cluster: 2 DeepSpeed workers on the CPU with gloo.

A launch costs Ray's and DeepSpeed's start (about 15 s on 2 cores, whatever it trains), so the
specifications share launches: one straight run, carrying every piece of state a resume must
restore, is the reference of every exact-resume specification; its checkpoints, put on S3, are
forked, found corrupt and relaunched through a killed worker, each checked by its own
specification; one arm of the ablation is the warm-started run. Stopping a run as if preempted
(``train.stop_after_epochs``) and relaunching it is the staged runs' specification
(tests/test_stages.py): a stage is a run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.cluster import init_ray
from pipeline.config import TrainConfig
from pipeline.exports import export_path, load_model
from pipeline.training import TrainResult, train
from sharding.storage import open_fs
from sharding.writer import write_shards
from tests.test_training_checks import Payload
from tests.wandb_offline import history, run_config

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).parents[1] / "configs" / "cpu-local.yaml"
# A cross-batch memory of 1.5 global batches (2 ranks × 16 subjects × 8 sessions), from step 2:
# a checkpoint at the end of the first epoch (step 3) holds a full queue and the momentum encoder.
MEMORY = ("loss.memory.size=384", "loss.memory.start_step=2")
# Hard batches from the first step; the table of epoch 0 stays in force in epoch 1, so a resume
# at the epoch boundary matches only if the checkpoint carried it.
HARD_BATCHES = ("data.hard_batches.enabled=true", "data.hard_batches.every_epochs=2")
# A persistent threshold: a resume that lost it would restart it at the batch's own d*.
THRESHOLD = ("loss.options.threshold_momentum=0.9",)
# configs/gpu.yaml's precision: fp32 weights, the model's forward under bf16 autocast (CPU autocast
# runs it too), reaching validation, the centroids and the momentum encoder.
BF16 = ("train.precision=bf16",)
EXTRAS = (*MEMORY, *HARD_BATCHES, *THRESHOLD, *BF16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("shards")
    write_shards("synth:240:0", str(out), subjects_per_shard=60, val_subjects=30, test_subjects=30)
    return str(out)


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint: str):
    """One local cluster for the module; created after the S3 variables so workers inherit them."""
    import ray

    init_ray()
    yield
    ray.shutdown()


def config(shards: str, storage: str, name: str, *overrides: str) -> TrainConfig:
    return TrainConfig.load(
        CONFIG,
        [f"data.shards={shards}", f"run.storage={storage}", f"run.name={name}", "train.log_every=2", *overrides],
    )


@pytest.fixture(scope="module")
def straight_run(shards: str, ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    """cpu-local's 2 epochs of 3 steps, uninterrupted, logged to W&B offline; in bf16 with a
    cross-batch memory, hard batches and a persistent threshold, so that every run compared with
    it must restore each of them (a run without them takes a subset of these paths; the staged
    runs' exact resumes are fp32 runs without them)."""
    storage = tmp_path_factory.mktemp("runs")
    return train(config(shards, str(storage), "straight", *EXTRAS), show_progress=False)


def parameters(export: str) -> dict[str, torch.Tensor]:
    model, _ = load_model(export)
    return model.state_dict()


def assert_same_parameters(left: str, right: str) -> None:
    a, b = parameters(left), parameters(right)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def test_a_run_reports_validation_metrics_and_exports_final_and_best_models(straight_run):
    metrics = straight_run.metrics
    assert metrics["step"] == metrics["total_steps"] > 0
    assert 0 <= metrics["val/eer"] < 0.5  # better than chance after 2 short epochs
    assert {"val/auc", "val/per_subject_eer", "val/fnmr_at_fmr_1%"} <= metrics.keys()
    for export in (straight_run.final_model, straight_run.best_model):
        model, meta = load_model(export)
        assert meta["model"]["name"] == "bigru"
    assert not Path(straight_run.run_dir, "_lock.json").exists()  # the run released its folder


def test_w_and_b_offline_run_holds_the_training_and_validation_metrics(straight_run):
    logs = list(Path(straight_run.run_dir, "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    rows = history(logs[0])
    logged = set().union(*rows)
    assert {
        "train/loss", "train/threshold", "train/soft_far", "train/soft_frr", "train/batch_eer",
        "train/lr", "train/grad_norm", "train/sessions_per_s", "train/step_time", "train/impostor_distance",
        "val/eer", "val/auc", "val/per_subject_eer", "val/fnmr_at_fmr_0.1%",
    } <= logged
    assert {row["val/det/_type"] for row in rows if "val/det/_type" in row} == {"image-file"}
    assert list(logs[0].parent.glob("files/media/images/val/det_*.png"))
    assert run_config(logs[0])["loss"]["name"] == "eer"


def test_hard_batches_log_their_neighbour_share_impostor_distance_and_centroid_time(straight_run):
    (log,) = Path(straight_run.run_dir, "wandb").glob("offline-run-*/run-*.wandb")
    logged = [row for row in history(log) if "train/neighbour_share" in row]
    assert logged and logged[0]["train/neighbour_share"] >= 6 / 16  # 2 seeds × 3 neighbours, nothing used yet
    assert all(0 < row["train/impostor_distance"] <= 2 and row["time/centroids_s"] > 0 for row in logged)


def test_a_run_with_a_memory_logs_its_fill_its_enqueue_and_its_momentum_encoder_time(straight_run):
    assert straight_run.metrics["train/memory_rows"] == 384
    assert straight_run.metrics["time/enqueue"] > 0 and straight_run.metrics["time/momentum_encoder"] > 0


def test_a_persistent_threshold_is_logged_beside_the_batch_s_own_threshold(straight_run):
    (log,) = Path(straight_run.run_dir, "wandb").glob("offline-run-*/run-*.wandb")
    logged = [row for row in history(log) if "train/threshold" in row]
    assert len(logged) == 3  # steps 2, 4 and 6 of 6
    assert all(row["train/threshold"] != row["train/batch_threshold"] for row in logged)  # d̄ lags d*


@dataclass
class RunOnS3:
    """What :func:`run_on_s3` went through, for each specification to check its part."""

    forked: TrainResult  # a new run resumed from the run's epoch-1 checkpoint
    refusal: str  # the relaunch's error, the run's latest checkpoint being corrupt
    latest: str  # that checkpoint, deleted as the refusal says
    previous: str  # the epoch-1 checkpoint before it, which the relaunch goes on from
    warned: list[str]  # the relaunch's warnings
    first_written: str  # the step tag of the relaunch's first checkpoint
    killed: list[int]  # the training worker killed once that checkpoint appeared
    relaunched: TrainResult  # the relaunch, through the killed worker, to the end


def new_checkpoint_steps(run_url: str) -> Callable[[], list[str]]:
    """A probe of the step tags (``step00000003``) of checkpoints that appear in ``run_url`` (a
    local folder or an ``s3://`` URL) after this call."""
    fs, root = open_fs(run_url)

    def steps() -> set[str]:
        fs.invalidate_cache()
        return {path.rstrip("/").rsplit("/", 1)[-1] for path in fs.glob(f"{root}/checkpoint_*/step*")}

    before = steps()
    return lambda: sorted(steps() - before)


def train_acting_after_a_checkpoint(run: TrainConfig, act: Callable[[list[str]], None]) -> TrainResult:
    """Train ``run`` while a thread waits for its first new checkpoint, then calls ``act`` with the
    step tags it saw (nothing, if the run ended first)."""
    new_steps = new_checkpoint_steps(run.run_dir)
    ended = threading.Event()

    def watch() -> None:
        seen: list[str] = []
        while not seen:
            if ended.wait(0.05):
                return
            seen = new_steps()
        act(seen)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        return train(run, show_progress=False)
    finally:
        ended.set()
        watcher.join()


def kill_a_training_worker() -> int:
    """SIGKILL one training worker of this test's cluster; its pid."""
    for process in psutil.Process().children(recursive=True):  # this test's cluster only
        try:
            title = " ".join([process.name(), *process.cmdline()])
        except psutil.Error:  # it ended while we looked
            continue
        if "RayTrainWorker" in title:
            os.kill(process.pid, signal.SIGKILL)
            return process.pid
    raise AssertionError("no training worker to kill")


@pytest.fixture(scope="module")
def run_on_s3(shards, ray_cluster, s3_endpoint, straight_run) -> RunOnS3:
    """The straight run's checkpoints (epoch ends, steps 3 and 6) and Ray's record of them put on
    S3, as a run trained there leaves them when killed during its last checkpoint's upload; then
    one launch per specification, each compared with the straight run:

    1. a new run resumes from the epoch-1 checkpoint (``resume_from``: a fork);
    2. the latest checkpoint being cut short, the relaunch is refused before Ray starts; the
       checkpoint is deleted, as the refusal says;
    3. the relaunch goes on from the epoch-1 checkpoint, checkpointing every 2 steps, with a retry
       (``train.max_failures=1``): one of its workers is killed once it has written a checkpoint."""
    import boto3

    bucket = f"train-runs-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    storage, settings = f"s3://{bucket}/runs", (*EXTRAS, "wandb.enabled=false")
    run_url = f"{storage}/interrupted"
    fs, run = open_fs(run_url)
    local = Path(straight_run.run_dir)
    checkpoints = sorted(folder.name for folder in local.glob("checkpoint_*") if folder.is_dir())
    for name in checkpoints:
        fs.put(str(local / name), f"{run}/{name}", recursive=True)
    fs.put_file(str(local / "checkpoint_manager_snapshot.json"), f"{run}/checkpoint_manager_snapshot.json")
    previous, latest = (f"{run_url}/{name}" for name in checkpoints)

    forked = train(config(shards, storage, "forked", *settings), resume_from=previous, show_progress=False)

    (states,) = fs.glob(f"{run}/{checkpoints[-1]}/step*/mp_rank_00_model_states.pt")
    fs.pipe_file(states, fs.cat_file(states)[:100])  # an interrupted upload
    relaunch = config(shards, storage, "interrupted", "train.checkpoint_every=2", "train.max_failures=1", *settings)
    with pytest.raises(ValueError) as refused:
        train(relaunch, show_progress=False)
    fs.rm(f"{run}/{checkpoints[-1]}", recursive=True)

    seen: list[str] = []
    killed: list[int] = []

    def kill(steps: list[str]) -> None:
        seen.extend(steps)
        killed.append(kill_a_training_worker())

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        relaunched = train_acting_after_a_checkpoint(relaunch, kill)
    return RunOnS3(forked, str(refused.value), latest, previous, [str(w.message) for w in warned],
                   seen[0] if seen else "", killed, relaunched)


def test_resuming_from_a_checkpoint_on_s3_as_a_new_run_matches_the_straight_run(run_on_s3, straight_run):
    """From the end of an epoch, with a full memory queue and the epoch's hard-batch table."""
    assert run_on_s3.forked.metrics["step"] == straight_run.metrics["step"]
    assert run_on_s3.forked.checkpoint.startswith(run_on_s3.forked.run_dir + "/checkpoint_")  # a URL, s3:// kept
    assert_same_parameters(run_on_s3.forked.final_model, straight_run.final_model)


def test_a_relaunch_whose_latest_checkpoint_is_corrupt_is_refused_naming_the_way_out(run_on_s3):
    """The driver loads every file of the checkpoint Ray would resume, weights-only, before Ray
    starts; the refusal names the one way out that loses only that checkpoint."""
    assert run_on_s3.refusal.startswith(f"{run_on_s3.latest}/step00000006/mp_rank_00_model_states.pt: ")
    assert run_on_s3.refusal.endswith(
        f"; delete {run_on_s3.latest} to go on from the previous checkpoint ({run_on_s3.previous})")


def test_deleting_a_corrupt_latest_checkpoint_goes_on_from_the_previous_one_and_finishes(run_on_s3, straight_run):
    """The relaunch repairs Ray's snapshot, which still names the deleted checkpoint (Ray alone
    would refuse the whole run), and resumes from the epoch-1 checkpoint on S3: its first
    checkpoint is step 4's (a run trained afresh would write step 2's first), and it ends with the
    straight run's parameters."""
    assert any(message.endswith(f"the run goes on from {run_on_s3.previous}") for message in run_on_s3.warned)
    assert run_on_s3.first_written == "step00000004"
    assert run_on_s3.relaunched.metrics["step"] == straight_run.metrics["step"]
    assert_same_parameters(run_on_s3.relaunched.final_model, straight_run.final_model)


def test_a_killed_worker_is_replaced_and_the_run_ends_as_if_nothing_happened(run_on_s3, straight_run):
    """Ray starts a new worker group (``train.max_failures``), which resumes from the latest
    checkpoint Ray recorded before the kill, each rank downloading its own copy from S3."""
    assert run_on_s3.killed, "no training worker was found to kill"
    assert run_on_s3.relaunched.metrics["step"] == straight_run.metrics["step"]
    assert_same_parameters(run_on_s3.relaunched.final_model, straight_run.final_model)


def test_a_relaunch_of_a_finished_run_launches_nothing_and_reports_the_same(shards, straight_run, tmp_path,
                                                                            monkeypatch):
    import pipeline.training.driver

    shutil.copytree(straight_run.run_dir, tmp_path / "straight")
    monkeypatch.setattr(pipeline.training.driver, "launch", lambda *args, **kwargs: pytest.fail("launched"))
    again = train(config(shards, str(tmp_path), "straight", *EXTRAS), show_progress=False)
    assert (again.metrics, again.curve, again.sessions) == (straight_run.metrics, straight_run.curve,
                                                            straight_run.sessions)
    assert again.final_model == export_path(str(tmp_path / "straight"), "final")


def test_a_relaunch_with_a_different_batch_shape_or_model_is_refused_before_training(shards, straight_run):
    storage = str(Path(straight_run.run_dir).parent)
    with pytest.raises(ValueError, match="subjects_per_batch changed since the state was saved"):
        train(config(shards, storage, "straight", *EXTRAS, "data.subjects_per_batch=12", "wandb.enabled=false"),
              show_progress=False)
    with pytest.raises(ValueError,
                       match="saved for model .*'embedding_size': 64.*this run trains .*'embedding_size': 32"):
        train(config(shards, storage, "straight", *EXTRAS, "model.embedding_size=32", "wandb.enabled=false"),
              show_progress=False)


def test_a_relaunch_whose_latest_checkpoint_was_tampered_with_is_refused_without_running_it(
    shards, straight_run, tmp_path
):
    run = tmp_path / "tampered"
    shutil.copytree(straight_run.run_dir, run)
    latest = sorted(folder for folder in run.glob("checkpoint_*") if folder.is_dir())[-1]
    states = next(latest.glob("step*/mp_rank_00_model_states.pt"))
    marker = tmp_path / "executed"
    torch.save({"module": Payload(marker)}, states)
    with pytest.raises(ValueError, match=f"{states}: refused to load: it names io.open"):
        train(config(shards, str(tmp_path), "tampered", *EXTRAS, "wandb.enabled=false"), show_progress=False)
    assert not marker.exists()


def test_a_warm_start_from_another_architecture_is_refused_before_training(shards, straight_run, tmp_path):
    with pytest.raises(ValueError, match="init_from.*exported for"):
        train(config(shards, str(tmp_path), "wrong", f"train.init_from={straight_run.run_dir}",
                     "model.embedding_size=32"), show_progress=False)


def test_a_loss_that_cannot_be_built_is_refused_before_training(shards, tmp_path):
    with pytest.raises(ValueError, match="'triplet' is not one of its terms"):
        train(config(shards, str(tmp_path), "bad-loss", "loss.name=eer+multisimilarity",
                     "loss.options.weights.triplet=1"), show_progress=False)
    assert not (tmp_path / "bad-loss").exists()


@pytest.fixture(scope="module")
def ablation(shards, ray_cluster, straight_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ablation's output folder: a triplet baseline and an EERLoss arm, 4 steps each, validated
    every 2 steps and at the end of the 3-batch epoch. The EERLoss arm's own overrides warm-start
    it from the straight run's best export at rate 0, which makes it the warm-start specification's
    run too (a launch costs more than the arm's steps)."""
    from pipeline.experiment import ABLATION_ARMS, run_experiment

    out = tmp_path_factory.mktemp("ablation")
    frozen = [f"train.init_from={straight_run.best_model}", "train.lr=0"]
    arms = {"eer-area-frozen": [*ABLATION_ARMS["eer-area"], *frozen], "triplet-all": ABLATION_ARMS["triplet-all"]}
    run_experiment(
        str(CONFIG), shards, out, arms,
        overrides=[f"run.storage={out / 'runs'}", "train.max_steps=4", "wandb.enabled=false"],
        validations=2, show_progress=False,
    )
    return out


def test_an_ablation_trains_every_arm_on_the_same_budget_and_writes_tables_and_figures(ablation):
    results = json.loads((ablation / "results.json").read_text())
    assert results["best_baseline"] == "triplet-all"
    rows = {row["arm"]: row for row in results["arms"]}
    assert rows.keys() == {"eer-area-frozen", "triplet-all"}
    assert {row["steps"] for row in rows.values()} == {4}
    assert Path(rows["eer-area-frozen"]["run_dir"]).name.startswith("eer-")  # runs are named by loss and config
    assert all(row["wall_s"] > 0 for row in rows.values())
    validated = [step for step, _ in rows["triplet-all"]["val_curve"]]
    assert validated == [2, 3, 4]  # every 2 steps, and at the end of the 3-batch epoch
    assert rows["triplet-all"]["steps_to_best_baseline"] in validated  # it reaches its own final EER
    assert all(0 <= row["eer"] <= 1 and 0 <= row["kvc_eer"] <= 1 for row in rows.values())  # both protocols
    for figure in ("det.png", "val_eer.png", "results.md"):
        assert (ablation / figure).stat().st_size > 0


def test_an_experiment_run_again_with_test_impostors_only_scores_its_trained_arms_on_every_test_pair(
    shards, ablation, tmp_path, monkeypatch
):
    """Validate on a sample, test on every pair: the arms keep their runs and curves; the test
    numbers are those of every impostor pair, as `eerpipe evaluate --impostors all` gives them."""
    import pipeline.training.driver
    from pipeline.evaluation.commands import score_split
    from pipeline.experiment import ABLATION_ARMS, run_experiment

    monkeypatch.setattr(pipeline.training.driver, "launch", lambda *args, **kwargs: pytest.fail("launched"))
    run_experiment(
        str(CONFIG), shards, tmp_path, {"triplet-all": ABLATION_ARMS["triplet-all"]},
        overrides=[f"run.storage={ablation / 'runs'}", "train.max_steps=4", "wandb.enabled=false"],
        validations=2, show_progress=False, test_impostors="all",
    )
    (trained,) = [row for row in json.loads((ablation / "results.json").read_text())["arms"]
                  if row["arm"] == "triplet-all"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test_impostors"] == "all"
    (rescored,) = results["arms"]
    assert (rescored["run_dir"], rescored["val_curve"]) == (trained["run_dir"], trained["val_curve"])
    for protocol, prefix in (("session", ""), ("kvc", "kvc_")):
        every_pair = score_split(trained["run_dir"], shards, protocol=protocol, impostors="all").report["global"]
        assert rescored[f"{prefix}eer"] == every_pair["eer"]


def test_a_warm_started_run_begins_from_the_exported_weights(ablation, straight_run):
    """The ablation's EERLoss arm is one, at rate 0: it ends with the export's weights, which it
    began from (BatchNorm's running statistics move even at rate 0)."""
    (row,) = [row for row in json.loads((ablation / "results.json").read_text())["arms"]
              if row["arm"] == "eer-area-frozen"]
    (start, _), (end, _) = load_model(straight_run.best_model), load_model(export_path(row["run_dir"], "final"))
    weights = dict(end.named_parameters())
    assert all(torch.equal(weights[name], value) for name, value in start.named_parameters())


def test_a_bf16_run_validates_and_exports_fp32_weights_that_evaluation_embeds_as_validation_did(
    straight_run,
):
    """Its exact resumes are the S3 run's specifications (the straight run is bf16)."""
    assert 0 <= straight_run.metrics["val/eer"] <= 1
    for export in (straight_run.final_model, straight_run.best_model):
        assert all(value.dtype in (torch.float32, torch.int64) for value in parameters(export).values())
        assert load_model(export)[1]["precision"] == "bf16"


def test_a_run_that_fails_on_its_workers_ends_in_one_line_naming_the_run_the_rank_and_the_cause(
    shards, ray_cluster, tmp_path
):
    from typer.testing import CliRunner

    from pipeline.cli import app

    corrupt = tmp_path / "shards"
    shutil.copytree(shards, corrupt)
    for shard in corrupt.glob("train-*.tar"):  # the manifest (checked before launch) still holds
        shard.write_bytes(shard.read_bytes()[:-512])
    result = CliRunner().invoke(app, ["train", "--quiet", "--config", str(CONFIG), f"data.shards={corrupt}",
                                      f"run.storage={tmp_path}", "wandb.enabled=false"])
    assert result.exit_code == 1, result.output
    last_line = result.stderr.strip().splitlines()[-1]
    assert f"{tmp_path / 'cpu-local'}: training failed on rank " in last_line
    assert "ShardIntegrityError" in last_line and last_line.endswith("to go on from its last checkpoint")
