"""gather_embeddings: two gloo ranks with uneven batches train exactly like one process with the global batch;
use_rank0_buffers: every rank embeds for validation with the exported model's statistics."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.distributed as dist

from pipeline.distributed import gather_batch, gather_embeddings, use_rank0_buffers
from pipeline.losses.eer import EERLoss
from pipeline.losses.registry import build_loss
from pipeline.training.model_with_loss import ModelWithLoss
from tests.gloo_ranks import run_on_ranks

FEATURES, EMBEDDING = 6, 4
TOLERANCE = 1e-5


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over all unordered pairs: genuine distance squared, impostor hinge at margin 1."""
    distances = torch.cdist(embeddings, embeddings)
    genuine = labels[:, None] == labels[None, :]
    upper = torch.ones_like(genuine).triu(diagonal=1)
    per_pair = torch.where(genuine, distances**2, torch.relu(1.0 - distances) ** 2)
    return per_pair[upper].mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "contrastive": contrastive_loss,
    "eer": EERLoss(),
    "eer_unrolled_search": EERLoss(threshold_grad="unrolled"),
}


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """12 rows of 4 subjects; every subject has rows on both sides of the 7/5 split."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(12, FEATURES, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])
    return features, labels


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, EMBEDDING)
    ).double()


def train_step(
    features: torch.Tensor, labels: torch.Tensor, loss_fn: Callable
) -> tuple[float, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One forward/backward through the gather; gradients averaged over ranks like data parallel."""
    net = model()
    global_embeddings, global_labels = gather_embeddings(net(features), labels)
    loss = loss_fn(global_embeddings, global_labels)
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    if dist.is_initialized():
        for grad in grads:
            dist.all_reduce(grad)
            grad /= dist.get_world_size()
    return loss.item(), grads, global_embeddings.detach(), global_labels


class MaskedModel(torch.nn.Module):
    """The test model called as the ModelWithLoss calls a keystroke model: ``model(features, mask)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = model()

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.net(features)


# The training module's path: (loss name, shard the pairs across ranks?).
VERIFIED = {
    "eer, sharded pairs": ("eer", True),
    "eer, replicated": ("eer", False),
    "eer+multisimilarity, eer term sharded": ("eer+multisimilarity", True),
}


def model_with_loss_step(features: torch.Tensor, labels: torch.Tensor, name: str) -> tuple[float, list[torch.Tensor]]:
    """One step through :class:`ModelWithLoss` (gather, then the loss, sharded or not), gradients averaged."""
    loss_name, shard_pairs = VERIFIED[name]
    module = ModelWithLoss(MaskedModel().double(), build_loss(loss_name, EMBEDDING), shard_pairs=shard_pairs)
    loss, _ = module(features, None, labels)
    loss.backward()
    grads = [p.grad for p in module.model.parameters()]
    if dist.is_initialized():
        for grad in grads:
            dist.all_reduce(grad)
            grad /= dist.get_world_size()
    return loss.item(), grads


SPLITS = {"7+5": (7, 5), "0+12": (0, 12)}  # rows per rank; every subject has rows on both ranks in 7+5


def rank_main(rank: int, world: int) -> dict:
    """One rank: for each split, train one step on its own rows only; return what it saw."""
    features, labels = global_batch()
    results = {}
    for split, sizes in SPLITS.items():
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        for name, loss_fn in LOSSES.items():
            results[split, name] = train_step(features[rows], labels[rows], loss_fn)
        for name in VERIFIED:
            results[split, name] = model_with_loss_step(features[rows], labels[rows], name)
        own = gather_batch(torch.zeros(sizes[rank], 1), labels[rows]).rows
        results[split, "rows"] = (own.start, own.stop)
    return results


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Two gloo ranks on loopback, spawned once for every split and loss."""
    return run_on_ranks(rank_main, 2, tmp_path_factory.mktemp("ranks"))


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("split", SPLITS)
def test_two_ranks_match_one_process_holding_the_global_batch(
    rank_results: list[dict], split: str, name: str
) -> None:
    features, labels = global_batch()
    loss, grads, _, _ = train_step(features, labels, LOSSES[name])

    for rank, results in enumerate(rank_results):
        rank_loss, rank_grads, gathered, gathered_labels = results[split, name]
        assert rank_loss == pytest.approx(loss, abs=TOLERANCE), rank
        for rank_grad, grad in zip(rank_grads, grads, strict=True):
            torch.testing.assert_close(rank_grad, grad, atol=TOLERANCE, rtol=0)
        # Padding dropped, no row twice, labels in the same order as the rows.
        torch.testing.assert_close(gathered, model()(features).detach())
        assert torch.equal(gathered_labels, labels)


@pytest.mark.parametrize("name", VERIFIED)
@pytest.mark.parametrize("split", SPLITS)
def test_the_training_module_matches_one_process_whether_pairs_are_sharded_or_replicated(
    rank_results: list[dict], split: str, name: str
) -> None:
    """The ModelWithLoss feeds the loss float32 embeddings: partial sums added in another order round
    differently, by about 1e-6 of the largest gradient here (as much as float32 against float64
    in one process), so gradients are compared relative to their largest magnitude. Exactness
    itself is tested in float64 (tests/test_eer_sharded.py)."""
    features, labels = global_batch()
    loss, grads = model_with_loss_step(features, labels, name)
    for rank, results in enumerate(rank_results):
        rank_loss, rank_grads = results[split, name]
        assert rank_loss == pytest.approx(loss, rel=TOLERANCE, abs=TOLERANCE), rank
        for rank_grad, grad in zip(rank_grads, grads, strict=True):
            torch.testing.assert_close(rank_grad, grad, atol=TOLERANCE * grad.abs().max().item(), rtol=TOLERANCE)


@pytest.mark.parametrize("split", SPLITS)
def test_each_rank_learns_where_its_own_rows_sit_in_the_global_batch(rank_results: list[dict], split: str) -> None:
    first, second = SPLITS[split]
    assert [results[split, "rows"] for results in rank_results] == [(0, first), (first, first + second)]


def test_without_a_process_group_inputs_come_back_unchanged() -> None:
    embeddings, labels = torch.randn(3, 2), torch.tensor([1, 1, 2])
    global_embeddings, global_labels = gather_embeddings(embeddings, labels)
    assert global_embeddings is embeddings and global_labels is labels


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"embeddings \[n, D\] and labels \[n\]"):
        gather_embeddings(torch.randn(3, 2), torch.tensor([1, 2]))


def buffers_after_sharing(rank: int, world: int) -> list[torch.Tensor]:
    """A BatchNorm whose running statistics differ by rank, as after training on each rank's own
    batches, once it has taken rank 0's."""
    norm = torch.nn.BatchNorm1d(3)
    norm.running_mean.fill_(rank)
    norm.running_var.fill_(1 + rank)
    norm.num_batches_tracked.fill_(10 + rank)
    use_rank0_buffers(norm)
    return [buffer.clone() for buffer in norm.buffers()]


def test_every_rank_validates_with_rank_0s_running_statistics_the_ones_it_exports(tmp_path) -> None:
    rank0, rank1 = run_on_ranks(buffers_after_sharing, 2, tmp_path)
    assert torch.equal(rank0[0], torch.zeros(3)) and rank0[2].item() == 10
    for theirs, ours in zip(rank1, rank0, strict=True):
        assert torch.equal(theirs, ours)
