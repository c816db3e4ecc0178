"""SubjectEERLoss: every subject's own EER surrogate, averaged — the block KVC's mean per-subject EER counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.losses.registry import build_loss
from pipeline.losses.subject_eer import SubjectEERLoss
from pipeline.metrics import eer as exact_eer
from tests.test_eer_loss import clustered_batch


def mean_per_subject_eer(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """The official EER of each subject's comparisons (its rows with each other: genuine; with
    every other row: impostor), averaged over subjects."""
    distances = torch.cdist(embeddings.detach(), embeddings.detach())
    eers = []
    for subject in labels.unique():
        own = labels == subject
        within = distances[own][:, own]
        genuine = within[torch.ones_like(within, dtype=torch.bool).triu_(1)]
        impostor = distances[own][:, ~own].flatten()
        truth = np.r_[np.ones(len(genuine)), np.zeros(len(impostor))]
        eers.append(exact_eer(truth, -torch.cat([genuine, impostor]).numpy())[0])
    return float(np.mean(eers))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direct_variant_converges_to_the_mean_per_subject_eer(seed: int) -> None:
    embeddings, labels = clustered_batch(seed, subjects=12, per_subject=30, spread=0.9)
    loss = SubjectEERLoss(variant="direct", k=5000, search_steps=40, normalize=False)(embeddings, labels)
    assert abs(loss.item() - 100 * mean_per_subject_eer(embeddings, labels)) <= 0.1


def test_every_row_moves_on_both_sides_of_its_pairs() -> None:
    """A subject's term moves its own rows; an impostor pair is scored from each subject's side."""
    embeddings, labels = clustered_batch(3, subjects=6, per_subject=4)
    SubjectEERLoss()(embeddings, labels).backward()
    assert (embeddings.grad.abs().sum(1) > 0).all()


def test_it_sums_with_the_global_eer_loss_and_refuses_a_batch_without_an_eer() -> None:
    embeddings, labels = clustered_batch(4, subjects=6, per_subject=4)
    summed = build_loss("eer+subject_eer", 8, weights={"subject_eer": 0.5})(embeddings, labels)
    expected = build_loss("eer", 8)(embeddings, labels) + 0.5 * SubjectEERLoss()(embeddings, labels)
    torch.testing.assert_close(summed, expected)
    with pytest.raises(ValueError, match="two or more samples"):
        SubjectEERLoss()(embeddings[:6], torch.arange(6))


def test_a_persistent_threshold_is_refused_because_every_subject_has_its_own() -> None:
    with pytest.raises(ValueError, match="subject_eer: threshold_momentum is not supported"):
        build_loss("subject_eer", 4, threshold_momentum=0.9)
