"""FMRBandLoss: EERLoss's FNMR averaged over the FMR targets of a band — a run for an operating
band, selected by the FNMR at the band's low end (its pair sharding: tests/test_eer_sharded.py)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.experiment import operating_point_arms
from pipeline.losses.eer import EERLoss
from pipeline.losses.fmr_band import FMRBandLoss
from pipeline.losses.registry import build_loss
from pipeline.training.validator import selection_of

BAND = {"low": 0.1, "high": 0.4, "points": 4}  # targets 0.1, 0.2, 0.3, 0.4 on a 20-row batch's 150 impostor pairs


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(8).repeat_interleave(4)
    return torch.randn(32, 6, generator=generator) + 0.5 * labels[:, None], labels


@pytest.mark.parametrize("options", [{"variant": "direct"}, {}, {"threshold_grad": "unrolled", "search_steps": 6}])
def test_the_band_is_the_mean_of_eerloss_at_evenly_spaced_fmr_targets_in_value_and_gradient(options):
    embeddings, labels = batch()
    band_input, point_input = embeddings.clone().requires_grad_(), embeddings.clone().requires_grad_()
    band = FMRBandLoss(**BAND, **options)(band_input, labels)
    points = [EERLoss(target={"fmr": t}, **options)(point_input, labels) for t in (0.1, 0.2, 0.3, 0.4)]
    expected = torch.stack(points).mean()
    band.backward()
    expected.backward()
    torch.testing.assert_close(band, expected)
    torch.testing.assert_close(band_input.grad, point_input.grad)


def test_the_band_reports_its_low_points_statistics_and_scores_a_memory_like_eerloss():
    embeddings, labels = batch()
    memory = (torch.randn(12, 6), torch.arange(12) % 10)
    value, stats = build_loss("fmr_band", 6, **BAND)(embeddings, labels, return_stats=True, memory=memory)
    low_value, low_stats = EERLoss(target={"fmr": 0.1})(embeddings, labels, return_stats=True, memory=memory)
    assert stats["threshold"] == pytest.approx(low_stats.threshold)
    assert stats["soft_far"] == pytest.approx(0.1, abs=0.02)
    assert value.item() < low_value.item()  # higher FMRs of the band cost less FNMR


@pytest.mark.parametrize("options, message", [
    ({"low": 0.004, "high": 0.001}, "fmr_band needs 0 < low < high < 1"),
    ({"points": 1}, "an integer points >= 2"),
    ({"target": "eer"}, "fmr_band: target cannot be set"),
    ({"threshold_momentum": 0.9}, "fmr_band: threshold_momentum cannot be set"),
])
def test_a_malformed_band_is_refused_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        build_loss("fmr_band", 4, **options)


def test_the_operating_point_experiment_s_band_arm_is_selected_by_the_band():
    arms = operating_point_arms(1e-3, band=0.004)
    assert list(arms)[-1] == "target-fmr-band-0.001-0.004"
    config = TrainConfig.load(None, ["data.shards=unused", *arms["target-fmr-band-0.001-0.004"]])
    assert selection_of(config).key == "fnmr_at_fmr_0.1-0.4%"
    with pytest.raises(ValueError, match=r"--band must lie above --fmr \(0.001\) and below 1, got 0.0005"):
        operating_point_arms(1e-3, band=0.0005)
