"""Experiment plumbing that needs no training run (the runs themselves: tests/test_train.py)."""

from __future__ import annotations

import json
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

    def record(config, shards, out, arms, *, overrides, **_):  # the arms' shared overrides, instead of training
        seen.append(TrainConfig.load(config, list(overrides)).eval.impostors_per_session)
        out.mkdir()
        (out / "results.md").write_text("")

    monkeypatch.setattr("pipeline.experiment.run_experiment", record)
    result = CliRunner().invoke(app, ["experiment", "operating-point", "--shards", str(tmp_path), "-c", str(CONFIG),
                                      "--out", str(tmp_path / "out"), *given])
    assert result.exit_code == 0, result.output
    assert seen == [scored]


def test_a_test_impostor_count_that_is_not_a_count_is_refused_before_anything_runs(tmp_path):
    result = CliRunner().invoke(app, ["experiment", "operating-point", "--shards", str(tmp_path), "-c", str(CONFIG),
                                      "--out", str(tmp_path / "out"), "--test-impostors", "every"])
    assert result.exit_code == 1
    assert "--test-impostors takes a positive whole number or 'all', got 'every'" in result.output
    assert not (tmp_path / "out").exists()


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


@pytest.mark.parametrize("given, setting", [
    ([], "eval.impostors_per_session"),
    (["--test-impostors", "all", "eval.impostors_per_session=5"], "--test-impostors"),  # a sample validates
])
def test_an_experiment_whose_every_pair_test_scoring_would_not_fit_in_memory_is_refused_before_any_arm_trains(
    tmp_path, monkeypatch, given, setting
):
    import pipeline.evaluation.protocol
    from sharding.writer import write_shards

    write_shards("synth:80:0", str(tmp_path / "shards"), subjects_per_shard=40, val_subjects=5, test_subjects=5)
    monkeypatch.setattr(pipeline.evaluation.protocol, "REPORT_BYTES_PER_COMPARISON", 10**15)  # as a huge split
    result = CliRunner().invoke(app, ["experiment", "operating-point", "--shards", str(tmp_path / "shards"), "-c",
                                      str(CONFIG), "--out", str(tmp_path / "out"), *given,
                                      f"run.storage={tmp_path / 'runs'}"])
    assert result.exit_code == 1
    assert f"arm target-eer, the test split: {setting}=all makes" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_the_subjects_experiment_trains_the_recipe_and_its_control_at_every_size():
    from pipeline.experiment import subjects_arms

    arms, configs = subjects_arms([1000, 0], control="control.yaml")
    assert arms == {"subjects-1000": ["data.train_subjects=1000"],
                    "subjects-1000-control": ["data.train_subjects=1000"],
                    "subjects-all": ["data.train_subjects=0"], "subjects-all-control": ["data.train_subjects=0"]}
    assert configs == {"subjects-1000-control": "control.yaml", "subjects-all-control": "control.yaml"}
    assert subjects_arms([500]) == ({"subjects-500": ["data.train_subjects=500"]}, {})


def test_a_screen_names_each_arm_and_its_overrides_quoted_as_in_a_shell():
    from pipeline.experiment import named_arms

    arms = named_arms(["shipped:", "wide: model.options.hidden=128 model.embedding_size=128",
                       "band: 'loss.options={low: 0.001, high: 0.004}' train.stages[1].train.lr=1e-2"])
    assert arms == {"shipped": [], "wide": ["model.options.hidden=128", "model.embedding_size=128"],
                    "band": ["loss.options={low: 0.001, high: 0.004}", "train.stages[1].train.lr=1e-2"]}
    for spec, message in (("wide model.options.hidden=128", "must look like 'NAME: section.key=value"),
                          ("../up: train.lr=1", "must look like"), ):
        with pytest.raises(ValueError, match=message):
            named_arms([spec])
    with pytest.raises(ValueError, match="an arm named 'a' is given twice"):
        named_arms(["a: train.lr=1", "a: train.lr=2"])


def test_a_screen_with_a_malformed_arm_is_refused_in_one_line_before_anything_runs(tmp_path):
    result = CliRunner().invoke(app, ["experiment", "compare", "--shards", str(tmp_path / "none"), "--out",
                                      str(tmp_path / "out"), "--arm", "shipped:", "--arm", "wide=128"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: --arm 'wide=128' must look like")
    assert not (tmp_path / "out").exists()


def _results(folder: Path, arms: dict[str, tuple[int, float]], loss: str = "eer", steps: dict[str, int] | None = None
             ) -> Path:
    """An experiment's results.json: arm → (training subjects, test EER), every metric = the EER;
    on the test subjects of participant list "first" the same, on "second" twice as high; each arm
    of ``loss``, trained for 80 sessions in 10 steps (or in its ``steps``)."""
    from pipeline.experiment_summary import METRICS

    folder.mkdir()
    rows = [{"arm": arm, "loss": loss, "train_subjects": subjects, "steps": (steps or {}).get(arm, 10), "sessions": 80,
             **dict.fromkeys(METRICS, eer),
             "groups": {"first": dict.fromkeys(METRICS, eer), "second": dict.fromkeys(METRICS, 2 * eer)}}
            for arm, (subjects, eer) in arms.items()]
    (folder / "results.json").write_text(json.dumps({"arms": rows}))
    return folder


def test_a_summary_gives_each_arm_over_seeds_and_the_recipes_lead_over_its_control_against_subjects(tmp_path):
    from pipeline.experiment_summary import summarize

    leads = {100: [0.10, 0.12, 0.14], 1000: [0.20, 0.22, 0.24], 10000: [0.30, 0.32, 0.34]}  # +10 points a decade
    folders = [_results(tmp_path / f"seed{seed}", {
        **{f"subjects-{n}": (n, 0.05 * (1 - lead[seed])) for n, lead in leads.items()},
        **{f"subjects-{n}-control": (n, 0.05) for n in leads},
    }) for seed in range(3)]
    summary = summarize(folders, tmp_path / "summary", predict_at=100_000)
    assert summary.keys() == {"folders", "all", "first", "second"}  # every test subject, then each list's
    row = {row["arm"]: row for row in summary["all"]["arms"]}["subjects-100"]
    assert row["seeds"] == 3 and row["eer"] == pytest.approx((0.05 * 0.88, 0.05 * 0.02))
    second = {row["arm"]: row for row in summary["second"]["arms"]}["subjects-100"]
    assert second["kvc_eer"] == pytest.approx((0.1 * 0.88, 0.1 * 0.02))
    for part in ("all", "second"):  # the same relative lead on a list whose EERs are all twice as high
        lead = {lead["arm"]: lead for lead in summary[part]["leads"]}["subjects-1000"]
        assert lead["eer"]["per_seed"] == pytest.approx([0.20, 0.22, 0.24])
        assert lead["kvc_eer"]["mean_sd"] == pytest.approx((0.22, 0.02))
    trend = summary["all"]["trends"]["eer"]
    assert (trend["slope"], trend["predicted"]) == (pytest.approx(0.10), pytest.approx(0.42))
    assert trend["low"] < 0.42 < trend["high"]
    for figure in ("lead.png", "lead-first.png", "lead-second.png"):
        assert (tmp_path / "summary" / figure).stat().st_size > 0
    assert "42.0 %" in (tmp_path / "summary" / "summary.md").read_text()


def test_a_batch_sweep_run_once_per_loss_is_summarised_as_one_series_per_loss(tmp_path):
    from pipeline.experiment_summary import summarize

    steps = {"P16": 4, "P64": 1}  # the same sessions in 4 steps of 20 or in 1 of 80
    folders = [_results(tmp_path / f"{loss}-seed{seed}", {"P16": (100, eer), "P64": (100, eer - 0.01 * seed)},
                        loss=loss, steps=steps)
               for loss, eer in (("eer", 0.05), ("multisimilarity", 0.06)) for seed in range(2)]
    summary = summarize(folders, tmp_path / "summary")
    assert summary.keys() == {"folders", "eer", "multisimilarity"}
    assert summary["eer"].keys() == {"all", "first", "second"}
    rows = {row["arm"]: row for row in summary["multisimilarity"]["all"]["arms"]}
    assert rows["P16"]["eer"] == pytest.approx((0.06, 0.0)) and rows["P64"]["eer"][0] == pytest.approx(0.055)
    assert (tmp_path / "summary" / "batch.png").stat().st_size > 0
    assert "## multisimilarity: the test subjects of second" in (tmp_path / "summary" / "summary.md").read_text()


def test_a_summary_of_folders_with_different_arms_is_refused_naming_the_folder(tmp_path):
    from pipeline.experiment_summary import summarize

    first = _results(tmp_path / "a", {"eer-area": (100, 0.1)})
    other = _results(tmp_path / "b", {"triplet-all": (100, 0.1)})
    with pytest.raises(ValueError, match=f"{other}: its arms \\['triplet-all'\\] differ"):
        summarize([first, other], tmp_path / "out")


def test_an_embedded_split_scores_one_participant_lists_subjects_on_their_own(tmp_path):
    import numpy as np
    import torch

    from pipeline.evaluation.commands import EmbeddedSplit

    labels = np.repeat(np.arange(4), 3)  # subjects a, b, c, d with 3 sessions each
    split = EmbeddedSplit(torch.randn(12, 8), labels, {}, "test", ["a", "b", "c", "d"])
    (tmp_path / "source.txt").write_text("# one source\nb\nd\nzz\n")
    part = split.only(tmp_path / "source.txt")
    assert part.labels.tolist() == [1, 1, 1, 3, 3, 3]
    assert torch.equal(part.embeddings, split.embeddings[[3, 4, 5, 9, 10, 11]])
    (tmp_path / "one.txt").write_text("c\n")
    with pytest.raises(ValueError, match="one.txt: lists 1 of the test split's subjects"):
        split.only(tmp_path / "one.txt")
