"""EERLoss's persistent threshold: ``d̄ ← m·d̄ + (1−m)·d*`` across training calls, the loss
evaluated at ``d̄`` with the implicit threshold gradient (one process here; sharded ranks:
tests/test_eer_sharded.py; a resumed run: tests/test_train.py)."""

from __future__ import annotations

import io

import pytest
import torch

from pipeline.losses import EERLoss, pair_distances
from pipeline.losses.registry import build_loss, running_threshold_of
from tests.test_eer_loss import clustered_batch

MOMENTUM = 0.9
FMR = {"fmr": 0.05}


def persistent(**options) -> EERLoss:
    return EERLoss(target=FMR, threshold_momentum=MOMENTUM, **options)


def loss_and_gradient(loss: EERLoss, seed: int):
    embeddings, labels = clustered_batch(seed)
    value, stats = loss(embeddings, labels, return_stats=True)
    (gradient,) = torch.autograd.grad(value, embeddings)
    return value.detach(), gradient, stats


def test_the_first_training_call_starts_the_threshold_at_the_batch_s_own():
    value, gradient, stats = loss_and_gradient(persistent(), seed=1)
    plain_value, plain_gradient, plain_stats = loss_and_gradient(EERLoss(target=FMR), seed=1)
    assert stats.threshold == stats.batch_threshold == plain_stats.threshold
    assert torch.equal(value, plain_value) and torch.equal(gradient, plain_gradient)


def test_each_later_training_call_moves_it_by_the_momentum_average_and_evaluates_the_loss_there():
    loss = persistent(variant="direct", normalize=False)
    first = loss_and_gradient(loss, seed=1)[2].threshold
    value, gradient, stats = loss_and_gradient(loss, seed=2)
    assert stats.batch_threshold != pytest.approx(first, rel=1e-3)  # another batch, another d*
    assert stats.threshold == pytest.approx(MOMENTUM * first + (1 - MOMENTUM) * stats.batch_threshold, rel=1e-12)
    assert float(loss.running_threshold.value) == stats.threshold
    genuine, _ = pair_distances(*clustered_batch(2))
    soft_frr = torch.tanh(loss.k * (genuine - stats.threshold).clamp_min(0)).mean()
    assert value.item() == pytest.approx(100 * soft_frr.item(), rel=1e-9)  # FNMR_s at d̄, not at d*
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_where_the_threshold_equals_the_batch_s_own_the_loss_and_its_gradient_are_today_s():
    """So the gradient keeps the implicit threshold term: impostors near d̄ are still pushed."""
    loss = persistent()
    loss_and_gradient(loss, seed=1)
    value, gradient, stats = loss_and_gradient(loss, seed=1)  # d̄ = m·d* + (1−m)·d* = d*
    plain_value, plain_gradient, _ = loss_and_gradient(EERLoss(target=FMR), seed=1)
    assert stats.threshold == stats.batch_threshold
    assert torch.equal(value, plain_value) and torch.equal(gradient, plain_gradient)


def test_evaluation_uses_the_threshold_a_training_call_would_but_leaves_it_where_training_left_it():
    loss = persistent()
    loss_and_gradient(loss, seed=1)
    kept = loss.running_threshold.value.clone()
    embeddings, labels = clustered_batch(2)
    with torch.no_grad():
        evaluated = loss(embeddings, labels, return_stats=True)[1].threshold
    loss.eval()
    assert loss(embeddings, labels, return_stats=True)[1].threshold == evaluated
    assert torch.equal(loss.running_threshold.value, kept)
    loss.train()
    assert loss_and_gradient(loss, seed=2)[2].threshold == evaluated
    assert not torch.equal(loss.running_threshold.value, kept)


def test_a_restored_threshold_continues_exactly_as_the_saved_one():
    saved, restored = persistent(), persistent()
    loss_and_gradient(saved, seed=1)
    checkpoint = io.BytesIO()
    torch.save(saved.running_threshold.state_dict(), checkpoint)
    checkpoint.seek(0)
    restored.running_threshold.load_state_dict(torch.load(checkpoint, weights_only=True))
    for left, right in zip(loss_and_gradient(saved, seed=2), loss_and_gradient(restored, seed=2), strict=True):
        assert torch.equal(left, right) if isinstance(left, torch.Tensor) else left == right
    assert torch.equal(saved.running_threshold.value, restored.running_threshold.value)


def test_momentum_zero_is_the_per_batch_threshold_and_a_loss_sum_exposes_its_term_s_threshold():
    assert EERLoss(threshold_momentum=0).running_threshold is None
    assert running_threshold_of(build_loss("eer", 8)) is None
    summed = build_loss("multisimilarity+eer", 8, eer={"threshold_momentum": 0.5})
    assert running_threshold_of(summed).momentum == 0.5


@pytest.mark.parametrize(
    "options, message",
    [
        ({"threshold_momentum": 1.0}, r"threshold_momentum must lie in \[0, 1\), got 1.0"),
        ({"threshold_momentum": -0.1}, r"threshold_momentum must lie in \[0, 1\), got -0.1"),
        ({"threshold_momentum": 0.9, "threshold_grad": "unrolled"},
         "threshold_momentum=0.9 needs threshold_grad='implicit'.*got 'unrolled'"),
    ],
)
def test_a_momentum_outside_0_to_1_or_without_the_implicit_gradient_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        EERLoss(**options)
