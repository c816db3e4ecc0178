"""Training configs: a typo or a wrong type is an error that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import TrainConfig
from pipeline.train import deepspeed_config, lr_factor, wandb_run_id

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("name", ["cpu-local.yaml", "gpu.yaml"])
def test_the_shipped_configs_load(name):
    config = TrainConfig.load(CONFIGS / name)
    assert config.loss.name == "eer"
    assert deepspeed_config(config, config.train.num_workers)["train_batch_size"] > 0


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


def test_settings_deepspeed_cannot_honour_are_refused_before_launch():
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(TrainConfig.load(None, ["train.zero_stage=3"]), 2)
    with pytest.raises(ValueError, match="precision"):
        deepspeed_config(TrainConfig.load(None, ["train.precision=fp16"]), 2)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 0, 10, "linear")


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    assert [lr_factor(step, 4, 12, "cosine") for step in (0, 3)] == [0.25, 1.0]
    assert lr_factor(12, 4, 12, "cosine") == pytest.approx(0.0)
    assert lr_factor(8, 4, 12, "constant") == 1.0


def test_the_wandb_run_id_is_stable_per_run_and_differs_between_runs():
    a, b = TrainConfig.load(None, ["run.name=kvc run/1"]), TrainConfig.load(None, ["run.name=other"])
    assert wandb_run_id(a) == wandb_run_id(TrainConfig.load(None, ["run.name=kvc run/1"]))
    assert wandb_run_id(a) != wandb_run_id(b)
    assert wandb_run_id(a).startswith("kvc-run-1-")
