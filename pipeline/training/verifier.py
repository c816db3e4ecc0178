"""The module DeepSpeed trains: model, cross-rank gather, loss."""

from __future__ import annotations

import time

import torch
from torch import nn

from pipeline.distributed import gather_batch, world_size
from pipeline.losses.registry import PairShard


class Verifier(nn.Module):
    """Model and loss in one module, with the cross-rank gather between them.

    One module so that DeepSpeed optimises the loss's own weights too (ArcFace, CosFace), and
    so that "where does the loss see global pairs" is this forward. With ``shard_pairs`` (and
    more than one rank) a loss that can shard scores only this rank's share of the pairs.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, shard_pairs: bool = True) -> None:
        super().__init__()
        self.model, self.criterion, self.shard_pairs = model, criterion, shard_pairs
        self.timings: dict[str, float] = {}

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, return_stats: bool = False
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss on the global batch, and the loss's statistics when asked (else ``{}``)."""
        start = time.perf_counter()
        embeddings = self.model(features, mask)
        middle = time.perf_counter()
        embeddings, labels, rows = gather_batch(embeddings.float(), labels)
        shard = PairShard(rows) if self.shard_pairs and world_size() > 1 else None
        result = self.criterion(embeddings, labels, return_stats=return_stats, shard=shard)
        loss, stats = result if return_stats else (result, {})
        self.timings = {"forward": middle - start, "gather_loss": time.perf_counter() - middle}
        return loss, stats
