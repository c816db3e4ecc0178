"""The cross-batch memory: a FIFO queue of earlier global batches, filled by a momentum encoder
or by the model itself, that the ModelWithLoss's loss scores the batch against (one process here;
the sharded loss with a memory: tests/test_eer_sharded.py; resuming a run: tests/test_train.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import MemorySection, TrainConfig
from pipeline.distributed import GatheredBatch
from pipeline.losses.registry import build_loss
from pipeline.training.memory import CrossBatchMemory, memory_of
from pipeline.training.model_with_loss import ModelWithLoss

FEATURES, EMBEDDING = 3, 4


class MeanModel(nn.Module):
    """A tiny model with the training models' call, ``model(features [n, T, F], mask [n, T])``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, EMBEDDING)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear(features.mean(1))


def batch(seed: int, subjects: int = 3, per_subject: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(seed * 10, seed * 10 + subjects).repeat_interleave(per_subject)
    features = torch.randn(len(labels), 5, FEATURES, generator=generator)
    return features, torch.ones(len(labels), 5, dtype=torch.bool), labels


def memory(size: int, encoder: str = "current", start_step: int = 0, momentum: float = 0.9) -> CrossBatchMemory:
    torch.manual_seed(0)
    settings = MemorySection(size=size, start_step=start_step, encoder=encoder, momentum=momentum)
    return CrossBatchMemory(settings, MeanModel(), EMBEDDING)


def enqueue(queue: CrossBatchMemory, seed: int) -> None:
    """Batch ``seed`` (labels ``10·seed …``) as one rank's gathered global batch."""
    features, mask, labels = batch(seed)
    embeddings = torch.randn(len(labels), EMBEDDING, generator=torch.Generator().manual_seed(seed))
    queue.enqueue(features, mask, labels, GatheredBatch(embeddings, labels, range(len(labels))))


def test_the_queue_keeps_the_latest_rows_of_earlier_batches_oldest_first():
    queue = memory(size=9)  # one and a half batches of 6 rows
    assert queue.rows(torch.device("cpu")) is None  # empty: the loss runs without a memory
    enqueue(queue, 1)
    assert queue.rows(torch.device("cpu"))[1].tolist() == [10, 10, 11, 11, 12, 12]
    enqueue(queue, 2)
    assert queue.rows(torch.device("cpu"))[1].tolist() == [11, 12, 12, 20, 20, 21, 21, 22, 22]
    enqueue(queue, 3)
    assert queue.rows(torch.device("cpu"))[1].tolist() == [21, 22, 22, 30, 30, 31, 31, 32, 32]


def test_rows_a_loss_holds_for_its_backward_are_not_changed_by_the_next_enqueue():
    queue = memory(size=6)
    enqueue(queue, 1)
    held, _ = queue.rows(torch.device("cpu"))
    before = held.clone()
    enqueue(queue, 2)
    assert torch.equal(held, before)


def test_the_memory_is_used_and_filled_from_its_start_step_on():
    queue = memory(size=6, start_step=3)
    assert [queue.active(step) for step in (1, 2, 3, 4)] == [False, False, True, True]


def test_the_momentum_encoder_queues_its_own_embeddings_and_follows_the_weights_by_their_average():
    queue = memory(size=6, encoder="momentum", momentum=0.9)
    model = MeanModel()
    with torch.no_grad():
        model.linear.weight.add_(1.0)
    start = queue.encoder.average.linear.weight.clone()
    queue.follow(model)
    torch.testing.assert_close(queue.encoder.average.linear.weight, 0.9 * start + 0.1 * model.linear.weight)
    features, mask, labels = batch(1)
    enqueue(queue, 1)
    torch.testing.assert_close(queue.rows(torch.device("cpu"))[0], queue.encoder.average(features, mask))
    assert set(queue.metrics()) == {"train/memory_rows", "time/momentum_encoder"}


def assert_same_state(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key, value in left.items():
        if isinstance(value, dict):
            assert_same_state(value, right[key])
        else:
            assert torch.equal(value, right[key]), key


@pytest.mark.parametrize("encoder", ["current", "momentum"])
def test_a_restored_memory_continues_exactly_as_the_saved_one(encoder: str):
    saved, restored = memory(size=8, encoder=encoder), memory(size=8, encoder=encoder)
    trained = MeanModel()  # other weights than the memories' starting copies
    enqueue(saved, 1)
    saved.follow(trained)
    restored.load_state_dict(saved.state_dict())
    for queue in (saved, restored):
        enqueue(queue, 2)
        queue.follow(trained)
    assert_same_state(saved.state_dict(), restored.state_dict())


def test_a_run_without_memory_settings_has_no_memory():
    assert memory_of(TrainConfig.load(None), MeanModel()) is None
    assert memory_of(TrainConfig.load(None, ["loss.memory.size=8"]), MeanModel()).size == 8


def test_the_model_with_loss_scores_the_batch_against_the_memory_then_enqueues_the_batch():
    torch.manual_seed(0)
    model, criterion = MeanModel(), build_loss("multisimilarity", EMBEDDING)
    queue = memory(size=12)
    enqueue(queue, 1)
    module = ModelWithLoss(model, criterion, memory=queue)
    features, mask, labels = batch(2)
    remembered = queue.rows(torch.device("cpu"))
    loss, _ = module(features, mask, labels, step=1)
    torch.testing.assert_close(loss, criterion(model(features, mask), labels, memory=remembered))
    assert queue.rows(torch.device("cpu"))[1].tolist() == [10, 10, 11, 11, 12, 12, 20, 20, 21, 21, 22, 22]
    assert module.memory_metrics()["train/memory_rows"] == 12


def test_the_momentum_encoder_normalises_with_the_batch_s_statistics_and_drops_nothing():
    """Running statistics differ between ranks (a checkpoint keeps rank 0's): the queue must not
    depend on them, nor on dropout's randomness."""
    model = nn.Sequential(nn.BatchNorm1d(FEATURES), nn.Dropout(0.5), nn.Linear(FEATURES, EMBEDDING))
    average = CrossBatchMemory(MemorySection(size=4), model, EMBEDDING).encoder.average
    assert [module.training for module in average] == [True, False, False]
