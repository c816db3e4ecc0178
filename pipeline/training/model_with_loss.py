"""The module DeepSpeed trains: model, cross-rank gather, loss (and the cross-batch memory)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.distributed import gather_batch, world_size
from pipeline.losses.registry import PairShard
from pipeline.models.precision import autocast
from pipeline.training.clock import clock
from pipeline.training.memory import CrossBatchMemory


class ModelWithLoss(nn.Module):
    """Model and loss in one module, with the cross-rank gather between them.

    One module so that DeepSpeed optimises the loss's own weights too (ArcFace, CosFace), and
    so that "where does the loss see global pairs" is this forward. With ``shard_pairs`` (and
    more than one rank) a loss that can shard scores only this rank's share of the pairs. With
    a ``memory``, the loss also scores the global batch against the queued earlier batches, and
    the batch then joins the queue; the memory is a plain attribute, not a submodule, so that
    DeepSpeed neither optimises nor saves its momentum encoder (the checkpointer does). With
    ``precision="bf16"`` the model's forward runs under bf16 autocast and everything after it
    (gather, loss) in fp32.
    """

    def __init__(
        self, model: nn.Module, criterion: nn.Module, shard_pairs: bool = True, memory: CrossBatchMemory | None = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.model, self.criterion, self.shard_pairs, self.memory = model, criterion, shard_pairs, memory
        self.precision = precision
        self.timings: dict[str, float] = {}

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, return_stats: bool = False,
        step: int = 0, wait_for: torch.device | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of step ``step`` on the global batch, and the loss's statistics when asked (else
        ``{}``); its timings wait for the device ``wait_for`` (on the steps that are logged)."""
        start = clock(wait_for)
        with autocast(features.device, self.precision):
            embeddings = self.model(features, mask)
        middle = clock(wait_for)
        batch = gather_batch(embeddings.float(), labels)
        shard = PairShard(batch.rows) if self.shard_pairs and world_size() > 1 else None
        remembering = self.memory is not None and self.memory.active(step)
        memory = self.memory.rows(batch.embeddings.device) if self.memory is not None and remembering else None
        result = self.criterion(batch.embeddings, batch.labels, return_stats=return_stats, shard=shard, memory=memory)
        loss, stats = result if return_stats else (result, {})
        end = clock(wait_for)
        if self.memory is not None and remembering:
            self.memory.enqueue(features, mask, labels, batch, wait_for)
        self.timings = {"forward": middle - start, "gather_loss": end - middle, "enqueue": clock(wait_for) - end}
        return loss, stats

    def follow_weights(self, wait_for: torch.device | None = None) -> None:
        """After an optimizer step: the momentum encoder (if any) takes in the new weights."""
        if self.memory is not None:
            self.memory.follow(self.model, wait_for)

    def memory_metrics(self) -> dict[str, float]:
        """The memory's fill and encoder time (nothing without a memory)."""
        return self.memory.metrics() if self.memory is not None else {}
