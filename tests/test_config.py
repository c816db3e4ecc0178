"""Training configs: a typo or a wrong type is an error that names the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.cluster import wandb_run_id
from pipeline.config import TrainConfig
from pipeline.training.engine import deepspeed_config
from pipeline.training.schedule import lr_factor

CONFIGS = Path(__file__).parents[1] / "configs"


# The shipped configs end with EERLoss, except the real-data recipes' controls, baselines.
ENDS_WITH = {"aalto-desktop-control.yaml": "multisimilarity", "aalto-desktop-1522-control.yaml": "multisimilarity"}


@pytest.mark.parametrize("name", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_the_shipped_configs_load(name):
    config = TrainConfig.load(CONFIGS / name)
    assert config.final_stage.loss.name == ENDS_WITH.get(name, "eer")
    for stage in [config.stage(index) for index in range(len(config.train.stages))] or [config]:
        assert deepspeed_config(stage, stage.train.num_workers)["train_batch_size"] > 0


@pytest.mark.parametrize("benchmark", ["aalto-desktop", "aalto-desktop-1522"])
def test_a_real_data_recipe_and_its_control_share_the_first_stage_and_see_the_same_sessions_after_it(benchmark):
    """The control is the best baseline given the same sessions: the same first stage, then as many
    participants' sessions at the same rate (at 8,068 participants each loss at its best batch, the
    same; at 1,522, results R17, EERLoss at 8x the batch against MultiSimilarity for 8x the steps)."""
    recipe, control = (TrainConfig.load(CONFIGS / f"{name}.yaml") for name in (benchmark, f"{benchmark}-control"))
    def first_stage(config: TrainConfig) -> dict:  # all but the run's name
        return {section: settings for section, settings in config.stage(0).to_dict().items() if section != "run"}
    def participants_seen(stage: TrainConfig) -> int:
        return stage.data.subjects_per_batch * stage.train.steps

    assert first_stage(recipe) == first_stage(control)
    eer_stage, baseline_stage = recipe.stage(1), control.stage(1)
    assert eer_stage.loss.name == "eer"
    assert participants_seen(eer_stage) == participants_seen(baseline_stage)
    assert eer_stage.train.lr == baseline_stage.train.lr


def test_an_override_reaches_one_stage_by_its_index_or_its_name_over_the_stages_own_setting():
    recipe = TrainConfig.load(CONFIGS / "aalto-desktop.yaml", [
        "train.stages[1].train.lr=1e-2", "train.stages[eer].data.subjects_per_batch=256",
        "train.stages[0].train.steps=608", "train.lr=3e-2",
    ])
    ms, eer = recipe.stage(0), recipe.stage(1)
    assert (ms.train.steps, ms.train.lr, ms.data.subjects_per_batch) == (608, 3e-2, 16)
    assert (eer.train.steps, eer.train.lr, eer.data.subjects_per_batch) == (582, 1e-2, 256)
    with pytest.raises(ValueError, match=r"override 'train.stages\[fine-tune\].train.lr=1': train.stages has no "
                                         r"stage 'fine-tune' \(its stages: \['multisimilarity', 'eer'\]\)"):
        TrainConfig.load(CONFIGS / "aalto-desktop.yaml", ["train.stages[fine-tune].train.lr=1"])
    with pytest.raises(ValueError, match=r"train.stages\[1\] \(eer\): model.embedding_size is the staged"):
        TrainConfig.load(CONFIGS / "aalto-desktop.yaml", ["train.stages[1].model.embedding_size=32"])


def test_overrides_reach_nested_keys_and_parse_yaml_values():
    config = TrainConfig.load(None, ["train.lr=3e-4", "loss.options={variant: direct}", "data.features=[keycode,hold]"])
    assert config.train.lr == 3e-4
    assert config.loss.options == {"variant": "direct"}
    assert config.data.features == ["keycode", "hold"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key.*train.lrr"),
        ("train.epochs=abc", "train.epochs must be of type int"),
        ("wandb.enabled=maybe", "wandb.enabled must be of type bool"),
        ("lr=1", "must look like section.key=value"),
    ],
)
def test_bad_overrides_are_refused_with_the_key_named(override, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.load(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.zero_stage=3", "train.zero_stage must be one of 0, 1, 2, got 3"),
        ("train.precision=fp16", "train.precision must be one of 'fp32', 'bf16', got 'fp16'"),
        ("train.schedule=linear", "train.schedule must be one of 'cosine', 'constant'"),
        ("eval.distance=manhattan", "eval.distance must be one of"),
        ("data.short_subjects=drop", "data.short_subjects must be one of"),
        ("wandb.mode=cloud", "wandb.mode must be one of"),
        ("train.epochs=0", "train.epochs must be ≥ 1, got 0"),
        ("train.epochs=-1", "train.epochs must be ≥ 1, got -1"),
        ("train.num_workers=0", "train.num_workers must be ≥ 1"),
        ("data.subjects_per_batch=0", "data.subjects_per_batch must be ≥ 1"),
        ("train.max_steps=-5", "train.max_steps must be ≥ 0"),
        ("run.name=' '", "run.name must be a folder name of letters, digits"),
        ("run.name=../../escape", "run.name must be a folder name of letters, digits, '_', '-', '+' and '.', "
                                  "not starting with '.', got '../../escape'"),
        ("run.name=runs/other", "run.name must be a folder name"),
        ("run.name=..", "run.name must be a folder name"),
        ("loss.memory.size=-1", "loss.memory.size must be ≥ 0, got -1"),
        ("loss.memory.start_step=-2", "loss.memory.start_step must be ≥ 0, got -2"),
        ("loss.memory.momentum=1", "loss.memory.momentum must lie in [0, 1), got 1.0"),
        ("loss.memory.encoder=ema", "loss.memory.encoder must be one of 'momentum', 'current', got 'ema'"),
        ("loss.options.threshold_momentum=1", "loss.options.threshold_momentum must lie in [0, 1), got 1"),
        ("loss.options.threshold_momentum=fast", "loss.options.threshold_momentum must lie in [0, 1), got 'fast'"),
        ("data.hard_batches.cap=0", "data.hard_batches.cap must be ≥ 1, got 0"),
        ("data.hard_batches.start=4", "data.hard_batches.start must be ≤ cap=3, got 4"),
        ("data.hard_batches.ramp_steps=-1", "data.hard_batches.ramp_steps must be ≥ 0"),
        ("data.hard_batches.kind=farthest", "data.hard_batches.kind must be one of 'nearest', 'semihard'"),
        ("data.hard_batches.every=2", "unknown config key(s) data.hard_batches.every"),
        ("eval.impostors_per_session=0", "eval.impostors_per_session must be ≥ 1, got 0"),
        ("eval.impostors_per_session=every", "eval.impostors_per_session must be an int or 'all', got 'every'"),
    ],
)
def test_a_config_refuses_a_value_outside_what_its_setting_allows_naming_the_key(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig.load(None, [override])


def test_impostors_per_session_is_a_count_or_all():
    assert TrainConfig.load(None, ["eval.impostors_per_session=25"]).eval.impostors_per_session == 25
    assert TrainConfig.load(None, ["eval.impostors_per_session=all"]).eval.impostors_per_session == "all"


def test_hard_batches_must_fit_their_seeds_and_neighbours_in_a_batch():
    fits = ["data.subjects_per_batch=8", "data.hard_batches.seeds=2", "data.hard_batches.cap=3"]
    assert TrainConfig.load(None, [*fits, "data.hard_batches.enabled=true"]).data.hard_batches.enabled
    with pytest.raises(ValueError, match=re.escape("data.hard_batches: seeds × (1 + cap) = 10 subjects do not fit "
                                                   "in data.subjects_per_batch=8")):
        TrainConfig.load(None, [*fits, "data.hard_batches.cap=4", "data.hard_batches.enabled=true"])


def test_hard_batches_off_leave_the_config_digest_as_before_the_setting():
    """Experiment runs are named by digest: existing arms keep their names."""
    plain = TrainConfig.load(None)
    assert plain.digest() == TrainConfig.load(None, ["data.hard_batches.cap=5"]).digest()
    assert plain.digest() != TrainConfig.load(None, ["data.hard_batches.enabled=true"]).digest()


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    assert [lr_factor(step, 4, 12, "cosine") for step in (0, 3)] == [0.25, 1.0]
    assert lr_factor(12, 4, 12, "cosine") == pytest.approx(0.0)
    assert lr_factor(8, 4, 12, "constant") == 1.0


def test_the_wandb_run_id_is_stable_per_run_and_differs_between_runs():
    a, b = TrainConfig.load(None, ["run.name=kvc+run.1"]), TrainConfig.load(None, ["run.name=other"])
    def run_id(config: TrainConfig) -> str:
        return wandb_run_id(config.run.storage, config.run.name)

    assert run_id(a) == run_id(TrainConfig.load(None, ["run.name=kvc+run.1"]))
    assert run_id(a) != run_id(b)
    assert run_id(a).startswith("kvc-run-1-")


def test_the_memory_is_off_by_default_and_a_memory_left_off_keeps_a_config_s_digest():
    plain = TrainConfig.load(None)
    assert plain.loss.memory.size == 0
    assert TrainConfig.load(None, ["loss.memory.momentum=0.5"]).digest() == plain.digest()  # earlier arms' names
    assert TrainConfig.load(None, ["loss.memory.size=512"]).digest() != plain.digest()


def test_a_loss_sum_s_threshold_momentum_is_its_eer_term_s_and_named_so_when_refused():
    summed = ["loss.name=eer+multisimilarity", "loss.options.eer.threshold_momentum=0.9"]
    assert TrainConfig.load(None, summed).loss.threshold_momentum == 0.9
    assert TrainConfig.load(None).loss.threshold_momentum == 0.0  # off: the per-batch threshold
    with pytest.raises(ValueError, match=re.escape("loss.options.eer.threshold_momentum must lie in [0, 1), got -0.5")):
        TrainConfig.load(None, ["loss.name=eer+multisimilarity", "loss.options.eer.threshold_momentum=-0.5"])
