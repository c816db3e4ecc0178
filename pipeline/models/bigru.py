"""A small bidirectional GRU: the fast CPU model of the loss study (docs/archive/research-notes.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.data.features import DEFAULT_FEATURES
from pipeline.models.layers import KeystrokeInput, MaskedBatchNorm, masked_mean


def reverse_real_keys(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reverse each session's real keys in place, padding left at the end: ``[B, L, C]``.

    Its own inverse. Running a forward GRU on it is the backward half of a BiGRU whose outputs at
    real keys never see padding — without packing, which costs ~4× on CPU.
    """
    lengths = mask.sum(1, keepdim=True)
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    order = torch.where(positions < lengths, lengths - 1 - positions, positions)
    return x.gather(1, order.unsqueeze(-1).expand_as(x))


class BiGRU(nn.Module):
    """Keycode embedding + timings → masked BatchNorm → BiGRU → mean over real keys → linear.

    ``forward(features [B, L, F], mask [B, L]) → [B, embedding_size]``. Both directions run
    unpacked: the forward one reads real keys before padding, the backward one reads the real keys
    reversed (:func:`reverse_real_keys`), so an embedding does not depend on padding.
    """

    def __init__(
        self, features: Sequence[str] = DEFAULT_FEATURES, embedding_size: int = 64, hidden: int = 64,
        keycode_dim: int = 8
    ) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.input = KeystrokeInput(features, keycode_dim)
        self.norm = MaskedBatchNorm(self.input.out_features)
        self.ahead = nn.GRU(self.input.out_features, hidden, batch_first=True)
        self.behind = nn.GRU(self.input.out_features, hidden, batch_first=True)
        self.project = nn.Linear(2 * hidden, embedding_size)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.input(features), mask)
        ahead, _ = self.ahead(x)
        behind, _ = self.behind(reverse_real_keys(x, mask))
        return self.project(masked_mean(torch.cat([ahead, reverse_real_keys(behind, mask)], dim=-1), mask))
