"""The module DeepSpeed trains: model, cross-rank gather, loss."""

from __future__ import annotations

import time

import torch
from torch import nn

from pipeline.distributed import gather_embeddings


class Verifier(nn.Module):
    """Model and loss in one module, with the cross-rank gather between them.

    One module so that DeepSpeed optimises the loss's own weights too (ArcFace, CosFace), and
    so that "where does the loss see global pairs" is this forward.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.model, self.criterion = model, criterion
        self.timings: dict[str, float] = {}

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, return_stats: bool = False
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss on the global batch, and the loss's statistics when asked (else ``{}``)."""
        start = time.perf_counter()
        embeddings = self.model(features, mask)
        middle = time.perf_counter()
        embeddings, labels = gather_embeddings(embeddings.float(), labels)
        result = self.criterion(embeddings, labels, return_stats=return_stats)
        loss, stats = result if return_stats else (result, {})
        self.timings = {"forward": middle - start, "gather_loss": time.perf_counter() - middle}
        return loss, stats
