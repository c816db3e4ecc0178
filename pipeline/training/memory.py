"""Cross-batch memory: the loss also scores the batch against embeddings of recent global batches.

A pair loss improves with the number of pairs it sees (docs/design.md §5), and a memory adds
``N × M`` pairs per step for the cost of a Gram block, without a larger batch. The queue holds
*detached* embeddings and labels of the last ``loss.memory.size`` rows of earlier global
batches (oldest first); every rank fills it from the gathered batch, so every rank holds the
same queue and a pair-sharded loss can score its own rows against the whole of it.

Why a momentum encoder (the default ``encoder="momentum"``): embeddings queued by the training
model itself go stale as its weights move, and a naive memory measured badly (docs/design.md §7).
MoCo's remedy is to queue the embeddings of an exponential moving average of the model
(``ema = m · ema + (1 − m) · θ`` after every optimizer step), which drifts slowly, so old and new
rows stay comparable. The average runs without dropout, and its BatchNorm layers normalise with
the batch's own statistics, as the training model's do: running statistics differ between ranks
and a checkpoint keeps rank 0's only, so embeddings computed from them would change on resume.
``encoder="current"`` queues the training model's own detached embeddings (the naive form, for
comparison).

Same-session pairs: a session can meet itself across the batch and the memory only when the
queue spans more than an epoch. Such a pair is accepted: it is genuine either way (same label).
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from pipeline.config import MemorySection, TrainConfig
from pipeline.distributed import GatheredBatch, gather_batch
from pipeline.losses.eer import Memory
from pipeline.models.precision import autocast
from pipeline.training.clock import clock


def memory_resume_problem(config: TrainConfig, saved: dict[str, Any]) -> str | None:
    """Why a checkpoint's memory part cannot continue this run's (``None``: it can): the queue
    and the momentum encoder continue only with the same size and encoder, and a run without a
    memory continues only a checkpoint without one."""
    saved_memory = saved.get("config", {}).get("loss", {}).get("memory") if "memory" in saved else None
    theirs, mine = _memory_shape(saved_memory or {"size": 0}), _memory_shape(asdict(config.loss.memory))
    return f"saved with cross-batch memory {theirs}, this run has {mine}" if theirs != mine else None


def _memory_shape(memory: dict[str, Any]) -> str:
    return f"size={memory['size']} encoder={memory['encoder']}" if memory["size"] else "none"


def memory_of(config: TrainConfig, model: nn.Module) -> CrossBatchMemory | None:
    """The run's memory (its encoder a copy of ``model`` as it starts), or ``None`` when it has none."""
    if not config.loss.memory.size:
        return None
    return CrossBatchMemory(config.loss.memory, model, config.model.embedding_size, config.train.precision)


class MomentumEncoder:
    """An exponential moving average of the model's weights, which embeds batches for the queue.

    Not an ``nn.Module`` attribute of the trained module: DeepSpeed must neither optimise nor
    save it; the checkpoint holds it as the memory's part.
    """

    def __init__(self, model: nn.Module, momentum: float, precision: str = "fp32") -> None:
        self.average = _batch_statistics_without_dropout(copy.deepcopy(model).requires_grad_(False))
        self.momentum, self.precision = momentum, precision

    @torch.no_grad()
    def embed(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """This rank's batch as the average embeds it (no gradient: the queue holds constants)."""
        average = self.average.to(features.device)
        with autocast(features.device, self.precision):
            return average(features, mask).float()

    @torch.no_grad()
    def follow(self, model: nn.Module) -> None:
        """``average = m · average + (1 − m) · weights``."""
        self.average.to(next(model.parameters()).device)
        for average, weight in zip(self.average.parameters(), model.parameters(), strict=True):
            average.lerp_(weight.to(average.dtype), 1 - self.momentum)


def _batch_statistics_without_dropout(model: nn.Module) -> nn.Module:
    """``model`` in eval mode (no dropout) except its BatchNorm layers (see the module doc)."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
    return model


class CrossBatchMemory:
    """The FIFO queue of earlier global batches and the encoder that fills it; a checkpoint part."""

    def __init__(self, settings: MemorySection, model: nn.Module, embedding_size: int, precision: str = "fp32") -> None:
        self.size, self.start_step = settings.size, settings.start_step
        momentum = settings.encoder == "momentum"
        self.encoder = MomentumEncoder(model, settings.momentum, precision) if momentum else None
        self.embeddings = torch.zeros(0, embedding_size)
        self.labels = torch.zeros(0, dtype=torch.long)
        self.encoder_seconds = {"embed": 0.0, "follow": 0.0}  # the momentum encoder's latest times

    def active(self, step: int) -> bool:
        """Whether step ``step`` uses and fills the memory."""
        return step >= self.start_step

    def rows(self, device: torch.device) -> Memory | None:
        """The queued ``(embeddings, labels)`` on ``device``, or ``None`` while the queue is empty.
        Enqueuing replaces these tensors rather than writing into them, so a loss may keep them
        for its backward pass."""
        if not len(self.labels):
            return None
        return self.embeddings.to(device), self.labels.to(device)

    def enqueue(
        self, features: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, batch: GatheredBatch,
        wait_for: torch.device | None = None,
    ) -> None:
        """Add this step's global ``batch`` (as the loss saw it, gathered from this rank's
        ``features``, ``mask``, ``labels``): its own embeddings (``encoder="current"``) or the
        momentum encoder's, gathered the same way (a collective: every rank calls it). The
        oldest rows beyond ``size`` leave the queue. The encoder's time waits for ``wait_for``."""
        embeddings = batch.embeddings
        if self.encoder is not None:
            start = clock(wait_for)
            embeddings = gather_batch(self.encoder.embed(features, mask), labels).embeddings
            self.encoder_seconds["embed"] = clock(wait_for) - start
        self.embeddings = torch.cat([self.embeddings.to(embeddings.device), embeddings.detach().float()])[-self.size :]
        self.labels = torch.cat([self.labels.to(batch.labels.device), batch.labels])[-self.size :]

    def follow(self, model: nn.Module, wait_for: torch.device | None = None) -> None:
        """After an optimizer step: the momentum encoder's average takes in the new weights (its
        time waits for ``wait_for``)."""
        if self.encoder is not None:
            start = clock(wait_for)
            self.encoder.follow(model)
            self.encoder_seconds["follow"] = clock(wait_for) - start

    def metrics(self) -> dict[str, float]:
        """What the metrics sink logs: the queue's fill and the momentum encoder's time."""
        metrics = {"train/memory_rows": float(len(self.labels))}
        if self.encoder is not None:
            metrics["time/momentum_encoder"] = sum(self.encoder_seconds.values())
        return metrics

    def state_dict(self) -> dict[str, Any]:
        encoder = self.encoder.average.state_dict() if self.encoder is not None else {}
        return {"embeddings": self.embeddings.cpu(), "labels": self.labels.cpu(), "encoder": encoder}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.embeddings, self.labels = state["embeddings"], state["labels"]
        if self.encoder is not None:
            self.encoder.average.load_state_dict(state["encoder"])
