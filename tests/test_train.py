"""Distributed training on a real local Ray cluster: 2 DeepSpeed workers on the CPU with gloo.

One straight run is shared by several specifications; each other run is compared with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.cluster import init_ray
from pipeline.config import TrainConfig
from pipeline.exports import load_model
from pipeline.training import train
from sharding.writer import write_shards
from tests.test_training_checks import Payload
from tests.wandb_offline import history, run_config

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).parents[1] / "configs" / "cpu-local.yaml"
# A cross-batch memory of 1.5 global batches (2 ranks × 16 subjects × 8 sessions), from step 2:
# a run stopped after its first epoch (3 steps) saves a full queue and the momentum encoder.
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
    storage = tmp_path_factory.mktemp("runs")
    return train(config(shards, str(storage), "straight"), show_progress=False)


@pytest.fixture(scope="module")
def straight_extras_run(shards: str, ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    """A bf16 run with a cross-batch memory, hard batches and a persistent threshold: each carries
    state a resume must restore."""
    storage = tmp_path_factory.mktemp("runs")
    return train(config(shards, str(storage), "straight-extras", *EXTRAS), show_progress=False)


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


def test_hard_batches_log_their_neighbour_share_impostor_distance_and_centroid_time(straight_extras_run):
    (log,) = Path(straight_extras_run.run_dir, "wandb").glob("offline-run-*/run-*.wandb")
    logged = [row for row in history(log) if "train/neighbour_share" in row]
    assert logged and logged[0]["train/neighbour_share"] >= 6 / 16  # 2 seeds × 3 neighbours, nothing used yet
    assert all(0 < row["train/impostor_distance"] <= 2 and row["time/centroids_s"] > 0 for row in logged)


def test_a_run_with_a_memory_logs_its_fill_its_enqueue_and_its_momentum_encoder_time(straight_extras_run):
    assert straight_extras_run.metrics["train/memory_rows"] == 384
    assert straight_extras_run.metrics["time/enqueue"] > 0 and straight_extras_run.metrics["time/momentum_encoder"] > 0


def test_a_persistent_threshold_is_logged_beside_the_batch_s_own_threshold(straight_extras_run):
    (log,) = Path(straight_extras_run.run_dir, "wandb").glob("offline-run-*/run-*.wandb")
    logged = [row for row in history(log) if "train/threshold" in row]
    assert len(logged) == 3  # steps 2, 4 and 6 of 6
    assert all(row["train/threshold"] != row["train/batch_threshold"] for row in logged)  # d̄ lags d*


def test_stopping_after_an_epoch_and_relaunching_or_resuming_from_it_on_s3_matches_the_straight_run(
    shards, ray_cluster, s3_url, straight_extras_run
):
    """With every piece of state a resume must restore (memory, hard batches, a persistent
    threshold), in bf16; a plain run's exact resume is the killed-worker specification's."""
    first = train(config(shards, s3_url, "resumed", "train.stop_after_epochs=1", "wandb.enabled=false", *EXTRAS),
                  show_progress=False)
    assert first.metrics["step"] == straight_extras_run.metrics["step"] // 2
    assert first.checkpoint.startswith("s3://")
    second = train(config(shards, s3_url, "resumed", "wandb.enabled=false", *EXTRAS), show_progress=False)
    assert second.metrics["step"] == straight_extras_run.metrics["step"]
    assert_same_parameters(second.final_model, straight_extras_run.final_model)
    fork = train(config(shards, s3_url, "forked", "wandb.enabled=false", *EXTRAS), resume_from=first.checkpoint,
                 show_progress=False)
    assert_same_parameters(fork.final_model, straight_extras_run.final_model)


def kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list[int]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(run_dir.glob("checkpoint_2*")):
        time.sleep(0.05)
    for process in psutil.Process().children(recursive=True):  # this test's cluster only
        try:
            title = " ".join([process.name(), *process.cmdline()])
        except psutil.Error:  # it ended while we looked
            continue
        if "RayTrainWorker" in title:
            os.kill(process.pid, signal.SIGKILL)
            killed.append(process.pid)
            return


def test_a_killed_worker_is_replaced_and_the_run_ends_as_if_nothing_happened(
    shards, ray_cluster, straight_run, tmp_path
):
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(tmp_path / "faulty", killed))
    killer.start()
    result = train(
        config(shards, str(tmp_path), "faulty", "train.checkpoint_every=2", "train.max_failures=1",
               "wandb.enabled=false"),
        show_progress=False,
    )
    killer.join()
    assert killed, "no training worker was found to kill"
    assert result.metrics["step"] == straight_run.metrics["step"]
    assert_same_parameters(result.final_model, straight_run.final_model)


def test_a_relaunch_with_a_different_batch_shape_or_model_is_refused_before_training(shards, straight_run):
    storage = str(Path(straight_run.run_dir).parent)
    with pytest.raises(ValueError, match="subjects_per_batch changed since the state was saved"):
        train(config(shards, storage, "straight", "data.subjects_per_batch=12", "wandb.enabled=false"),
              show_progress=False)
    with pytest.raises(ValueError,
                       match="saved for model .*'embedding_size': 64.*this run trains .*'embedding_size': 32"):
        train(config(shards, storage, "straight", "model.embedding_size=32", "wandb.enabled=false"),
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
        train(config(shards, str(tmp_path), "tampered", "wandb.enabled=false"), show_progress=False)
    assert not marker.exists()


def test_deleting_a_corrupt_latest_checkpoint_goes_on_from_the_previous_one_and_finishes(
    shards, ray_cluster, straight_run, tmp_path
):
    """The documented way out of a refused checkpoint: delete it. The relaunch repairs Ray's
    snapshot and resumes from the epoch-1 checkpoint: it writes only the last step's checkpoint
    and ends with the straight run's parameters (Ray alone would refuse the whole run)."""
    run = tmp_path / "recovered"
    shutil.copytree(straight_run.run_dir, run)
    previous, latest = sorted(folder for folder in run.glob("checkpoint_*") if folder.is_dir())
    states = next(latest.glob("step*/mp_rank_00_model_states.pt"))
    states.write_bytes(states.read_bytes()[:100])  # an interrupted upload
    recovered = config(shards, str(tmp_path), "recovered", "wandb.enabled=false")
    way_out = f"; delete {latest} to go on from the previous checkpoint ({previous})"
    with pytest.raises(ValueError, match=re.escape(way_out)):
        train(recovered, show_progress=False)
    shutil.rmtree(latest)
    with pytest.warns(UserWarning, match=f"the run goes on from {re.escape(str(previous))}$"):
        result = train(recovered, show_progress=False)
    assert result.metrics["step"] == straight_run.metrics["step"]
    (written,) = {folder for folder in run.glob("checkpoint_*") if folder.is_dir()} - {previous}
    assert [tag.name for tag in written.glob("step*")] == [f"step{result.metrics['step']:08d}"]
    assert_same_parameters(result.final_model, straight_run.final_model)


def test_a_warm_started_run_begins_from_the_exported_weights(shards, ray_cluster, straight_run, tmp_path):
    frozen = train(
        config(shards, str(tmp_path), "warm", f"train.init_from={straight_run.best_model}", "train.lr=0",
               "train.max_steps=1", "wandb.enabled=false"),
        show_progress=False,
    )
    (start, _), (end, _) = load_model(straight_run.best_model), load_model(frozen.final_model)
    weights = dict(end.named_parameters())  # (BatchNorm's running statistics move even at lr 0)
    assert all(torch.equal(weights[name], value) for name, value in start.named_parameters())


def test_a_warm_start_from_another_architecture_is_refused_before_training(shards, straight_run, tmp_path):
    with pytest.raises(ValueError, match="init_from.*exported for"):
        train(config(shards, str(tmp_path), "wrong", f"train.init_from={straight_run.run_dir}",
                     "model.embedding_size=32"), show_progress=False)


def test_a_loss_that_cannot_be_built_is_refused_before_training(shards, tmp_path):
    with pytest.raises(ValueError, match="'triplet' is not one of its terms"):
        train(config(shards, str(tmp_path), "bad-loss", "loss.name=eer+multisimilarity",
                     "loss.options.weights.triplet=1"), show_progress=False)
    assert not (tmp_path / "bad-loss").exists()


def test_an_ablation_trains_every_arm_on_the_same_budget_and_writes_tables_and_figures(shards, ray_cluster, tmp_path):
    from pipeline.experiment import ABLATION_ARMS, run_experiment

    arms = {name: ABLATION_ARMS[name] for name in ("eer-area", "triplet-all")}
    run_experiment(
        str(CONFIG), shards, tmp_path / "out", arms,
        overrides=[f"run.storage={tmp_path / 'runs'}", "train.max_steps=4", "wandb.enabled=false"],
        validations=2, show_progress=False,
    )
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["best_baseline"] == "triplet-all"
    rows = {row["arm"]: row for row in results["arms"]}
    assert rows.keys() == {"eer-area", "triplet-all"}
    assert {row["steps"] for row in rows.values()} == {4}
    assert Path(rows["eer-area"]["run_dir"]).name.startswith("eer-")  # runs are named by loss and config
    assert all(row["wall_s"] > 0 for row in rows.values())
    validated = [step for step, _ in rows["triplet-all"]["val_curve"]]
    assert validated == [2, 3, 4]  # every 2 steps, and at the end of the 3-batch epoch
    assert rows["triplet-all"]["steps_to_best_baseline"] in validated  # it reaches its own final EER
    assert all(0 <= row["eer"] <= 1 and 0 <= row["kvc_eer"] <= 1 for row in rows.values())  # both protocols
    for figure in ("det.png", "val_eer.png", "results.md"):
        assert (tmp_path / "out" / figure).stat().st_size > 0


def test_a_bf16_run_validates_and_exports_fp32_weights_that_evaluation_embeds_as_validation_did(
    straight_extras_run,
):
    """Its exact resume is the S3 resume specification's (the extras runs are bf16)."""
    assert 0 <= straight_extras_run.metrics["val/eer"] <= 1
    for export in (straight_extras_run.final_model, straight_extras_run.best_model):
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
