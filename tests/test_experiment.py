"""Experiment plumbing that needs no training run (the runs themselves: tests/test_train.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import TrainConfig
from pipeline.experiment import ABLATION_ARMS, memory_arms, operating_point_arms, steps_to_reach

CONFIG = Path(__file__).parents[1] / "configs" / "cpu-local.yaml"


def test_steps_to_reach_is_the_first_validated_step_at_or_below_the_target():
    curve = [(100, 0.30), (200, 0.21), (300, 0.19), (400, 0.20)]
    assert steps_to_reach(curve, 0.20) == 300
    assert steps_to_reach(curve, 0.30) == 100
    assert steps_to_reach(curve, 0.10) is None


def test_the_ablation_compares_eer_loss_with_every_kind_of_baseline():
    losses = {override.split("=")[1] for arm in ABLATION_ARMS.values() for override in arm
              if override.startswith("loss.name=")}
    assert {"eer", "set2set", "triplet_all", "triplet", "contrastive", "arcface", "multisimilarity"} <= losses


def test_an_option_given_to_every_arm_survives_the_arms_that_set_options_of_their_own():
    for arm, own in (("eer-direct", {"variant": "direct"}),
                     ("eer-area-authors", {"normalize": False, "floor": "hard"})):
        config = TrainConfig.load(CONFIG, ["loss.options.beta=0.9", *ABLATION_ARMS[arm]])
        assert config.loss.options == {"beta": 0.9, **own}


def test_an_unknown_arm_is_refused_before_anything_runs(tmp_path):
    result = CliRunner().invoke(
        app, ["experiment", "ablation", "--shards", str(tmp_path), "--out", str(tmp_path / "out"),
              "--arms", "eer-area,hinge"]
    )
    assert result.exit_code == 1
    assert "unknown arm(s) ['hinge']" in result.output
    assert not (tmp_path / "out").exists()


def test_the_memory_experiment_gives_each_loss_every_memory_and_keeps_the_plain_arm():
    arms = memory_arms(["eer-area", "multisimilarity"], [0, 4096], ["momentum", "current"])
    assert list(arms) == [
        "eer-area", "eer-area-mem4096-momentum", "eer-area-mem4096-current",
        "multisimilarity", "multisimilarity-mem4096-momentum", "multisimilarity-mem4096-current",
    ]
    assert arms["eer-area"] == ABLATION_ARMS["eer-area"]  # size 0 is the ablation's own run
    config = TrainConfig.load(CONFIG, arms["multisimilarity-mem4096-current"])
    assert ((config.loss.name, config.loss.memory.size, config.loss.memory.encoder)
            == ("multisimilarity", 4096, "current"))


def test_an_unknown_memory_encoder_is_refused_before_anything_runs(tmp_path):
    result = CliRunner().invoke(app, ["experiment", "memory", "--shards", str(tmp_path), "--out", str(tmp_path / "out"),
                                      "--encoders", "momentum,stale"])
    assert result.exit_code == 1
    assert "unknown memory encoder(s) ['stale']" in result.output
    assert not (tmp_path / "out").exists()


def test_the_operating_point_experiment_adds_a_persistent_threshold_arm_only_when_given_a_momentum():
    plain = {"target-eer": ["loss.name=eer"], "target-fmr-0.001": ["loss.name=eer", "loss.options.target.fmr=0.001"]}
    assert operating_point_arms(1e-3) == plain  # the finished arms keep their names and runs
    arms = operating_point_arms(1e-3, threshold_momentum=0.99)
    assert list(arms) == [*plain, "target-fmr-0.001-persistent"]
    config = TrainConfig.load(CONFIG, arms["target-fmr-0.001-persistent"])
    assert (config.loss.options["target"], config.loss.threshold_momentum) == ({"fmr": 0.001}, 0.99)


@pytest.mark.parametrize("given, scored", [([], "all"), (["eval.impostors_per_session=50"], 50)])
def test_the_operating_point_experiment_scores_every_impostor_pair_unless_told_otherwise(
    tmp_path, monkeypatch, given, scored
):
    seen = []

    def record(config, shards, out, arms, *, overrides):  # the arms' shared overrides, instead of training
        seen.append(TrainConfig.load(config, list(overrides)).eval.impostors_per_session)
        out.mkdir()
        (out / "results.md").write_text("")

    monkeypatch.setattr("pipeline.experiment.run_experiment", record)
    result = CliRunner().invoke(app, ["experiment", "operating-point", "--shards", str(tmp_path), "-c", str(CONFIG),
                                      "--out", str(tmp_path / "out"), *given])
    assert result.exit_code == 0, result.output
    assert seen == [scored]


@pytest.mark.parametrize("momentum", ["1", "0"])  # 0 would train the plain FMR arm again under another name
def test_a_threshold_momentum_outside_0_to_1_is_refused_before_the_first_arm_trains(tmp_path, momentum):
    from sharding.writer import write_shards

    write_shards("synth:80:0", str(tmp_path / "shards"), subjects_per_shard=40, val_subjects=5, test_subjects=5)
    result = CliRunner().invoke(app, ["experiment", "operating-point", "--shards", str(tmp_path / "shards"),
                                      "-c", str(CONFIG), "--out", str(tmp_path / "out"),
                                      "--threshold-momentum", momentum,
                                      "run.storage=" + str(tmp_path)])
    assert result.exit_code == 1
    assert f"--threshold-momentum must lie in (0, 1), got {momentum}" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, option, value", [
    ("memory", "--sizes", "0,abc"), ("batch-size", "--subjects", "4,x"),
])
def test_a_list_that_is_not_whole_numbers_is_refused_naming_the_option(tmp_path, command, option, value):
    result = CliRunner().invoke(app, ["experiment", command, "--shards", str(tmp_path), "--out", str(tmp_path / "out"),
                                      option, value])
    assert result.exit_code == 1
    assert f"{option} takes whole numbers separated by commas, got {value!r}" in result.output
    assert not (tmp_path / "out").exists()


def test_a_bad_setting_of_any_arm_is_refused_before_the_first_arm_trains(tmp_path):
    from sharding.writer import write_shards

    write_shards("synth:80:0", str(tmp_path / "shards"), subjects_per_shard=40, val_subjects=5, test_subjects=5)
    result = CliRunner().invoke(app, ["experiment", "memory", "--shards", str(tmp_path / "shards"), "-c", str(CONFIG),
                                      "--out", str(tmp_path / "out"), "--sizes", "0,-5",
                                      "run.storage=" + str(tmp_path)])
    assert result.exit_code == 1
    assert "loss.memory.size must be ≥ 0, got -5" in result.output
    assert not (tmp_path / "out").exists()


def test_an_arm_is_named_by_its_whole_config_so_changed_settings_never_continue_a_stale_run(tmp_path):
    from pipeline.experiment import _arm_config
    from sharding.writer import write_shards

    write_shards("synth:80:0", str(tmp_path), subjects_per_shard=40, val_subjects=5, test_subjects=5)

    def name(*overrides: str) -> str:
        return _arm_config(str(CONFIG), str(tmp_path), ["run.storage=runs", *overrides], validations=4).run.name

    default = name("loss.name=eer")
    assert default.startswith("eer-")
    assert name("loss.name=eer") == default  # a relaunch resumes or re-scores the same run
    assert name("loss.name=eer", "data.subjects_per_batch=16") == default  # = cpu-local's P: the same arm
    assert name("loss.name=eer", "train.max_failures=5", "wandb.enabled=false") == default  # outcome unchanged
    assert name("loss.name=eer", "train.lr=0.01") != default
    assert name("loss.name=triplet_all").startswith("triplet_all-")


STAGES = ("train.stages=[{name: ms, loss.name: multisimilarity, train.epochs: 8}, "
          "{name: fine, loss.name: eer, train.epochs: 2}]")


def test_an_arm_may_be_a_staged_recipe_named_by_its_losses_and_validated_as_often_in_each_stage(tmp_path):
    from pipeline.experiment import _arm_config, recipe_loss
    from sharding.writer import write_shards

    write_shards("synth:80:0", str(tmp_path), subjects_per_shard=40, val_subjects=5, test_subjects=5)
    config = _arm_config(str(CONFIG), str(tmp_path), ["run.storage=runs", STAGES], validations=2)
    assert config.run.name.startswith("multisimilarity-then-eer-") and recipe_loss(config) == "multisimilarity-then-eer"
    # 8 steps, then 2: a rank's 30 subjects make one batch of 16 an epoch
    assert [config.stage(index).train.val_every for index in (0, 1)] == [4, 1]
    assert config.final_stage.train.num_to_keep == 1000


def test_an_arm_setting_what_every_stage_sets_again_is_refused_before_anything_runs(tmp_path):
    """The ablation's arms set loss.name, which each stage of this recipe sets again."""
    from sharding.writer import write_shards

    write_shards("synth:80:0", str(tmp_path / "shards"), subjects_per_shard=40, val_subjects=5, test_subjects=5)
    result = CliRunner().invoke(app, ["experiment", "ablation", "--shards", str(tmp_path / "shards"), "-c", str(CONFIG),
                                      "--out", str(tmp_path / "out"), "--arms", "eer-area,multisimilarity", STAGES,
                                      "run.storage=" + str(tmp_path)])
    assert result.exit_code == 1
    assert "loss.name is set by every stage of train.stages, so overriding it changes nothing" in result.output
    assert not (tmp_path / "out").exists()
