"""Staged training (``train.stages``): a MultiSimilarity stage, then an EERLoss stage at a larger
batch and its own rate, as one run. The Ray runs are real (2 gloo DeepSpeed ranks on the CPU);
one straight staged run is shared, and every interrupted run is compared with it bit for bit.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from pipeline.cluster import wandb_run_id
from pipeline.config import TrainConfig
from pipeline.training import train
from pipeline.training.schedule import lr_factor
from tests.test_train import CONFIG, assert_same_parameters, ray_cluster, shards  # noqa: F401 - fixtures
from tests.wandb_offline import history, run_config

# 3 steps of MultiSimilarity at P = 16 (one epoch of the 180 training subjects), then 4 steps of
# EERLoss at P = 30 (two epochs of 2 steps), each stage with its own rate.
STAGES = [
    {"name": "ms", "loss.name": "multisimilarity", "train": {"epochs": 1, "lr": 2e-2}},
    {"name": "large-batch", "loss": {"name": "eer"}, "data.subjects_per_batch": 30, "train.epochs": 2,
     "train.lr": 6e-3},
]

def staged(shard_dir: str, storage: Path, *overrides: str, stages: list[dict] = STAGES) -> TrainConfig:
    """cpu-local's settings with these stages, as the run ``staged`` in ``storage``."""
    config = TrainConfig.load(CONFIG, [f"data.shards={shard_dir}", f"run.storage={storage}", "run.name=staged",
                                       "train.log_every=1", *overrides])
    config.train.stages = stages
    return TrainConfig.from_dict(config.to_dict())


@pytest.fixture(scope="module")
def straight_staged_run(shards, ray_cluster, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811 - fixtures
    return train(staged(shards, tmp_path_factory.mktemp("runs")), show_progress=False)


def interrupted_copy(straight_run, tmp_path: Path, *removed: str) -> None:
    """The straight run's folder as a kill leaves it: without ``removed`` (and the staged run's exports)."""
    shutil.copytree(straight_run.run_dir, tmp_path / "staged")
    for path in ("export", *removed):
        shutil.rmtree(tmp_path / "staged" / path)


# --- the config ---------------------------------------------------------------------------------

def test_a_stage_overrides_the_config_in_dotted_or_nested_form_and_the_run_ends_with_the_last_stage():
    config = TrainConfig.from_dict({"train": {"lr": 1e-3, "stages": STAGES}})
    ms, large = config.stage(0), config.stage(1)
    assert (ms.loss.name, ms.train.epochs, ms.train.lr, ms.data.subjects_per_batch) == ("multisimilarity", 1, 2e-2, 32)
    assert (large.loss.name, large.train.epochs, large.train.lr, large.data.subjects_per_batch) == ("eer", 2, 6e-3, 30)
    assert config.final_stage.loss.name == "eer" and config.final_stage.train.stages == []
    assert TrainConfig.load(None).final_stage.loss.name == "eer"  # a run of one stage is its own


@pytest.mark.parametrize("stage, message", [
    ({"name": "large-batch", "data.subjects_per_batch": 0},
     "train.stages[1] (large-batch): data.subjects_per_batch must be ≥ 1, got 0"),
    ({"name": "large-batch", "train": {"lrr": 1}}, "train.stages[1] (large-batch): unknown config key(s) train.lrr"),
    ({"name": "large-batch", "model.embedding_size": 32},
     "train.stages[1] (large-batch): model.embedding_size is the staged run's, not a stage's"),
    ({"name": "large-batch", "run": {"name": "other"}}, "train.stages[1] (large-batch): run.name is the staged run's"),
    ({"name": "large-batch", "train.init_from": "runs/x"},
     "train.stages[1] (large-batch): train.init_from is the staged run's"),
    ({"name": "../up"}, "train.stages[1].name must be a folder name"),
    ({"loss.name": "eer"}, "train.stages[1] must be a mapping of a name and the settings it overrides"),
])
def test_a_bad_stage_is_refused_at_load_naming_the_stage_and_the_key(stage, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig.from_dict({"train": {"stages": [STAGES[0], stage]}})


def test_every_stage_is_checked_against_the_shards_before_the_first_stage_starts(shards, tmp_path):  # noqa: F811
    too_large = [STAGES[0], {**STAGES[1], "data.subjects_per_batch": 100}]
    with pytest.raises(ValueError, match=re.escape("train.stages[1] (large-batch): data.subjects_per_batch=100 on "
                                                   "train.num_workers=2 ranks needs 200 training subjects")):
        train(staged(shards, tmp_path, stages=too_large), show_progress=False)
    assert not list(tmp_path.glob("staged/stages/*"))  # no stage started


# --- the runs -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_staged_run_trains_each_stage_as_a_run_in_its_folder_and_exports_the_last_stage_s_models(
    straight_staged_run,
):
    run = Path(straight_staged_run.run_dir)
    assert sorted(path.name for path in (run / "stages").iterdir()) == ["0-ms", "1-large-batch"]
    for stage in ("0-ms", "1-large-batch"):  # checkpoints name their stage
        assert list((run / "stages" / stage).glob("checkpoint_*"))
    for which in ("best", "final"):
        export = f"export/{which}/model.pt"
        assert (run / export).read_bytes() == (run / "stages" / "1-large-batch" / export).read_bytes()
    metrics = straight_staged_run.metrics
    assert (metrics["step"], metrics["total_steps"], metrics["stage"]) == (7, 7, 1)
    assert straight_staged_run.sessions == (3 * 16 + 4 * 30) * 8 * 2  # steps × P × K × ranks, both stages
    assert [step for step, _ in straight_staged_run.curve] == [3, 5, 7]  # the kept checkpoints: epoch ends


@pytest.mark.slow
def test_a_relaunch_of_a_finished_staged_run_trains_nothing_and_reports_the_same(
    shards, straight_staged_run  # noqa: F811 - fixtures
):
    run = Path(straight_staged_run.run_dir)
    checkpoints = sorted(run.glob("stages/*/checkpoint_*"))
    again = train(staged(shards, run.parent), show_progress=False)
    assert sorted(run.glob("stages/*/checkpoint_*")) == checkpoints
    assert (again.metrics, again.curve, again.sessions) == (
        straight_staged_run.metrics, straight_staged_run.curve, straight_staged_run.sessions)


def test_a_finished_stage_whose_settings_now_end_elsewhere_is_refused_naming_it(
    shards, straight_staged_run, tmp_path  # noqa: F811 - fixtures
):
    shutil.copytree(straight_staged_run.run_dir, tmp_path / "staged")
    longer = [{**STAGES[0], "train": {"epochs": 2, "lr": 2e-2}}, STAGES[1]]
    checkpoints = sorted(tmp_path.glob("staged/stages/*/checkpoint_*"))
    with pytest.raises(ValueError, match=r"train.stages\[0\] \(ms\): finished at step 3, but its settings now end at "
                                         r"step 6; delete .*0-ms and the stages after it to train them again"):
        train(staged(shards, tmp_path, stages=longer), show_progress=False)
    assert sorted(tmp_path.glob("staged/stages/*/checkpoint_*")) == checkpoints


@pytest.mark.slow
def test_the_stages_log_into_one_w_and_b_run_whose_steps_continue_across_stages_with_each_stage_s_own_rate(
    straight_staged_run,
):
    run = Path(straight_staged_run.run_dir)
    logs = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2  # one launch per stage, one W&B run id
    assert {log.stem.removeprefix("run-") for log in logs} == {wandb_run_id(str(run.parent), "staged")}
    assert run_config(logs[0])["train"]["stages"] == STAGES  # the staged run's config
    rows = [row for log in logs for row in history(log) if "train/lr" in row]
    assert [(row["stage"], row["step"]) for row in rows] == [(0, 1), (0, 2), (0, 3), (1, 4), (1, 5), (1, 6), (1, 7)]
    for row in rows:  # the optimizer and its schedule restart with each stage (10 warm-up steps)
        base, steps, start = (2e-2, 3, 0) if row["stage"] == 0 else (6e-3, 4, 3)
        assert row["train/lr"] == pytest.approx(base * lr_factor(row["step"] - start, 10, steps, "cosine"))


@pytest.mark.slow
def test_a_staged_run_killed_before_its_first_stage_s_export_then_inside_its_second_stage_ends_as_the_straight_run(
    shards, ray_cluster, straight_staged_run, tmp_path  # noqa: F811
):
    """Both kills of a staged run in one sequence of launches (a launch costs far more than its
    steps), each relaunch checked as it goes.

    Killed between the first stage's last checkpoint and its export: the first stage is not
    finished without its export, so the relaunch has Ray resume it at its last step, where it only
    exports (it writes no checkpoint). From there, as from a kill exactly at the boundary (the
    first stage exported, the second not begun), the second stage starts from that export; it is
    stopped after its first epoch (a checkpoint, no export: as if preempted inside it). The next
    relaunch skips the finished first stage and resumes the second from its own checkpoint, not
    from the first stage's export: it writes only its last step's checkpoint."""
    staged_dir = tmp_path / "staged" / "stages"
    interrupted_copy(straight_staged_run, tmp_path, "stages/1-large-batch", "stages/0-ms/export/final")
    first_stage = sorted(staged_dir.glob("0-ms/checkpoint_*"))
    stopped = [STAGES[0], {**STAGES[1], "train.stop_after_epochs": 1}]
    first = train(staged(shards, tmp_path, "wandb.enabled=false", stages=stopped), show_progress=False)
    assert sorted(staged_dir.glob("0-ms/checkpoint_*")) == first_stage  # the first stage only exported
    export = staged_dir / "0-ms" / "export" / "final" / "model.pt"
    assert_same_parameters(str(export), str(Path(straight_staged_run.run_dir, "stages", "0-ms", "export", "final")))
    assert (first.metrics["step"], first.metrics["stage"]) == (3 + 2, 1)
    assert not Path(first.final_model).exists()

    checkpoints = set(staged_dir.glob("1-large-batch/checkpoint_*"))
    exported_at = export.stat().st_mtime_ns
    resumed = train(staged(shards, tmp_path, "wandb.enabled=false"), show_progress=False)
    assert export.stat().st_mtime_ns == exported_at  # the finished first stage was skipped
    assert resumed.metrics["step"] == straight_staged_run.metrics["step"]
    written = set(staged_dir.glob("1-large-batch/checkpoint_*")) - checkpoints
    assert [tag.name for folder in written for tag in folder.glob("step*")] == ["step00000004"]  # its last step only
    assert_same_parameters(resumed.final_model, straight_staged_run.final_model)
    assert_same_parameters(resumed.best_model, straight_staged_run.best_model)
