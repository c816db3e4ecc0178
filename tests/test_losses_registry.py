"""Every loss a training config can name runs forward and backward on a P×K batch."""

from __future__ import annotations

import itertools

import pytest
import torch
from pytorch_metric_learning import losses

from pipeline.losses.registry import LOSSES, MEMORY_LOSSES, build_loss
from pipeline.losses.set2set import Set2SetLoss

P, K, D = 8, 4, 16


def pk_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """P subjects × K sessions, rows shuffled (losses must not rely on label order)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(100, 100 + P).repeat_interleave(K)
    order = torch.randperm(P * K, generator=generator)
    return torch.randn(P * K, D, generator=generator).requires_grad_(), labels[order]


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_runs_forward_and_backward(name: str) -> None:
    embeddings, labels = pk_batch()
    loss = build_loss(name, D, num_classes=200)  # labels are global ids, below num_classes
    value = loss(embeddings, labels)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    assert torch.isfinite(embeddings.grad).all() and embeddings.grad.abs().sum() > 0
    for parameter in loss.parameters():  # classification losses: their weights learn too
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()


def test_classification_losses_need_a_class_count() -> None:
    assert sum(p.numel() for p in build_loss("arcface", D, num_classes=10).parameters()) == 10 * D
    with pytest.raises(ValueError, match="num_classes"):
        build_loss("cosface", D)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("softmax", D)


def test_losses_joined_by_plus_are_their_weighted_sum_with_options_per_term() -> None:
    embeddings, labels = pk_batch(2)
    summed = build_loss("eer+triplet_all", D, eer={"tau": 0.1}, triplet_all={"margin": 0.5}, weights={"triplet_all": 3})
    expected = build_loss("eer", D, tau=0.1)(embeddings, labels) + 3 * build_loss("triplet_all", D, margin=0.5)(
        embeddings, labels
    )
    torch.testing.assert_close(summed(embeddings, labels), expected)

    with pytest.raises(ValueError, match="'triplet' is not one of its terms"):
        build_loss("eer+multisimilarity", D, weights={"triplet": 1})
    with pytest.raises(ValueError, match="distinct loss names"):
        build_loss("eer+eer", D)
    with pytest.raises(ValueError, match="unknown loss 'softmax'"):
        build_loss("eer+softmax", D)
    for malformed in ({"eer": 3}, {"weights": {"multisimilarity": "abc"}}, {"weights": [1, 2]}):
        with pytest.raises(ValueError, match="must be a mapping"):
            build_loss("eer+multisimilarity", D, **malformed)


def test_a_sum_reports_the_batch_statistics_of_its_eer_term() -> None:
    """So a run trained with ``eer+…`` logs the threshold and soft rates, like plain EERLoss."""
    embeddings, labels = pk_batch(3)
    summed = build_loss("multisimilarity+eer", D, weights={"multisimilarity": 2})
    value, stats = summed(embeddings, labels, return_stats=True)
    alone, expected = build_loss("eer", D)(embeddings, labels, return_stats=True)
    torch.testing.assert_close(value, alone + 2 * build_loss("multisimilarity", D)(embeddings, labels))
    assert stats == expected
    assert set(stats) == {"threshold", "batch_threshold", "soft_far", "soft_frr", "batch_eer"}  # logged as train/<name>
    assert build_loss("triplet_all+contrastive", D)(embeddings, labels, return_stats=True)[1] == {}


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_reports_its_statistics_the_same_way(name: str) -> None:
    """``return_stats=True`` gives ``(the same loss, {name: value})`` for every loss: training
    logs them without asking which loss it has."""
    embeddings, labels = pk_batch(2)
    torch.manual_seed(0)
    loss = build_loss(name, D, num_classes=200)
    plain = loss(embeddings, labels)
    value, stats = loss(embeddings, labels, return_stats=True)
    torch.testing.assert_close(value, plain)
    assert isinstance(stats, dict) and all(isinstance(v, float) for v in stats.values())


def test_set2set_equals_its_definition_over_all_triplets() -> None:
    embeddings, labels = pk_batch(1)
    labels = labels.clone()
    labels[labels == 107] = 106  # unequal set sizes
    loss = Set2SetLoss(margin=1.5, beta=0.05)
    d = torch.cdist(embeddings, embeddings)
    hinges = [
        torch.relu(d[a, p] - d[a, n] + 1.5)
        for a, p, n in itertools.product(range(len(labels)), repeat=3)
        if a != p and labels[a] == labels[p] and labels[n] != labels[a]
    ]
    radii = []
    for label in labels.unique():
        members = embeddings[labels == label]
        radii.append((members - members.mean(0)).norm(dim=1).mean())
    radii = torch.stack(radii)
    expected = torch.stack(hinges).mean() + 0.05 * (radii / radii.mean() - 1).abs().mean()
    torch.testing.assert_close(loss(embeddings, labels), expected)


def test_set2set_survives_repeated_sessions() -> None:
    """short_subjects='repeat' yields identical embeddings: zero distances, zero radii."""
    embeddings = torch.randn(4, D).repeat_interleave(2, dim=0).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    Set2SetLoss()(embeddings, labels).backward()
    assert torch.isfinite(embeddings.grad).all()


def memory_batch(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Earlier batches: some of the batch's subjects, some others."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(100, 104), torch.arange(200, 206)]).repeat(2)
    return torch.randn(len(labels), D, generator=generator), labels


@pytest.mark.parametrize("name", LOSSES)
def test_exactly_the_pair_losses_take_a_memory(name: str) -> None:
    assert build_loss(name, D, num_classes=300).takes_memory == (name in MEMORY_LOSSES)


@pytest.mark.parametrize("name", ["set2set", "arcface", "eer+set2set"])
def test_a_loss_that_cannot_take_a_memory_refuses_one_naming_those_that_can(name: str) -> None:
    embeddings, labels = pk_batch()
    with pytest.raises(ValueError, match="cannot take a cross-batch memory; these losses can: .*multisimilarity"):
        build_loss(name, D, num_classes=300)(embeddings, labels, memory=memory_batch())


@pytest.mark.parametrize("name", sorted(set(MEMORY_LOSSES) - {"eer", "fmr_band"}))
def test_a_metric_learning_loss_scores_the_memory_as_the_librarys_cross_batch_memory_does(name: str) -> None:
    """The value of pytorch-metric-learning's ``CrossBatchMemory`` holding the same rows, once
    the batch is enqueued: the batch against the batch and the memory, without self-comparisons."""
    embeddings, labels = pk_batch(4)
    memory, memory_labels = memory_batch()
    criterion = build_loss(name, D)
    library = losses.CrossBatchMemory(criterion.loss.loss, D, memory_size=len(labels) + len(memory_labels),
                                      miner=criterion.loss.miner)
    library.add_to_memory(memory, memory_labels, len(memory_labels))
    expected = library(embeddings, labels)
    torch.testing.assert_close(criterion(embeddings, labels, memory=(memory, memory_labels)), expected)


@pytest.mark.parametrize("name", MEMORY_LOSSES)
def test_with_an_empty_memory_a_loss_and_its_gradient_are_those_without_one(name: str) -> None:
    embeddings, labels = pk_batch(6)
    criterion = build_loss(name, D)
    empty = (embeddings.new_zeros(0, D), labels[:0])
    (with_memory,) = torch.autograd.grad(value := criterion(embeddings, labels, memory=empty), embeddings)
    (without,) = torch.autograd.grad(plain := criterion(embeddings, labels), embeddings)
    torch.testing.assert_close(value, plain)
    torch.testing.assert_close(with_memory, without)


def test_a_sum_gives_every_term_the_same_memory() -> None:
    embeddings, labels = pk_batch(7)
    memory = memory_batch()
    summed = build_loss("eer+multisimilarity", D)(embeddings, labels, memory=memory)
    terms = [build_loss(name, D)(embeddings, labels, memory=memory) for name in ("eer", "multisimilarity")]
    torch.testing.assert_close(summed, sum(terms))
