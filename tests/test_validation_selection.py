"""Which validation metric picks a run's best export: the operating point its loss trains for."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import TrainConfig
from pipeline.metrics.verification import Roc, validate
from pipeline.training.validator import selection_of, sparse_selection

# 4 genuine and 6 impostor scores, higher = more alike; each threshold step moves one rate
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
SCORES = np.array([0.9, 0.8, 0.55, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1, 0.05])
ROC = Roc.of(*validate(LABELS, SCORES))


def config_of(*overrides: str) -> TrainConfig:
    return TrainConfig.load(None, ["data.shards=unused", *overrides])


@pytest.mark.parametrize("overrides", [
    ["loss.name=eer"],
    ["loss.name=multisimilarity"],
    ["loss.name=eer+multisimilarity"],
])
def test_a_run_trained_for_the_eer_keeps_its_lowest_validation_eer(overrides):
    selection = selection_of(config_of(*overrides))
    assert selection.key == "eer"
    assert selection.measure(ROC) == ROC.eer()[0]


@pytest.mark.parametrize("overrides", [
    ["loss.name=eer", "loss.options.target.fmr=0.001"],
    ["loss.name=eer+multisimilarity", "loss.options.eer.target.fmr=0.001"],
])
def test_a_run_trained_for_an_fmr_keeps_its_lowest_validation_fnmr_at_that_fmr(overrides):
    selection = selection_of(config_of(*overrides))
    assert selection.key == "fnmr_at_fmr_0.1%"  # the report's own key for that point
    assert selection.measure(ROC) == ROC.fnmr_at(0.001)


def test_a_run_trained_for_an_fnmr_keeps_its_lowest_validation_fmr_at_that_fnmr():
    selection = selection_of(config_of("loss.name=eer", "loss.options.target.fnmr=0.25"))
    assert selection.key == "fmr_at_fnmr_25%"
    # FNMR 0.25 first holds at threshold 0.55: three genuine scores accepted, one impostor (0.7)
    assert selection.measure(ROC) == ROC.fmr_at(0.25) == pytest.approx(1 / 6)


def test_a_run_trained_for_an_fmr_band_keeps_its_lowest_validation_fnmr_averaged_over_the_band():
    selection = selection_of(config_of("loss.name=fmr_band", "loss.options.low=0.1", "loss.options.high=0.4"))
    assert selection.key == "fnmr_at_fmr_10-40%"
    # the band's points are FMR 0.1, 0.2, 0.3 and 0.4, as it trains them
    assert selection.measure(ROC) == pytest.approx(np.mean([ROC.fnmr_at(rate) for rate in (0.1, 0.2, 0.3, 0.4)]))


VAL_SESSIONS = 2250  # 150 participants × 15 sessions: ~22 of 22,500 drawn impostor pairs pass FMR 0.1 %


def test_selecting_at_a_low_fmr_on_a_few_drawn_impostors_is_called_noise_before_the_launch():
    reason = sparse_selection(config_of("loss.name=eer", "loss.options.target.fmr=0.001"), VAL_SESSIONS)
    assert reason == (
        "checkpoints are selected at FMR 0.1 %, where the val split's 2250 sessions × eval.impostors_per_session=10 "
        "leave ~22 impostor comparisons past the threshold: the choice is mostly noise; "
        "set eval.impostors_per_session=all"
    )
    assert "FMR 0.1 %" in sparse_selection(config_of("loss.name=fmr_band"), VAL_SESSIONS)


@pytest.mark.parametrize("overrides", [
    ["loss.name=eer"],  # the EER rests on thousands of comparisons either side
    ["loss.name=eer", "loss.options.target.fmr=0.001", "eval.impostors_per_session=all"],
    ["loss.name=eer", "loss.options.target.fmr=0.01"],  # ~225 past the threshold
])
def test_selection_with_enough_impostors_past_its_threshold_is_not_questioned(overrides):
    assert sparse_selection(config_of(*overrides), VAL_SESSIONS) is None


def test_a_checkpoint_written_before_the_selection_metric_keeps_its_best_value():
    from pipeline.training.state import RunState

    state = RunState()
    state.load_state_dict({"step": 608, "best_val_eer": 0.0709, "train_seconds": 201.5})  # older run state
    assert (state.step, state.best_val, state.train_seconds) == (608, 0.0709, 201.5)
