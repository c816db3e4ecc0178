"""A small Transformer encoder over keystrokes, mean-pooled over the real keys."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.data.features import DEFAULT_FEATURES
from pipeline.models.layers import KeystrokeInput, attendable, masked_mean, zero_padding


class KeystrokeTransformer(nn.Module):
    """``forward(features [B, L, F], mask [B, L]) → embeddings [B, embedding_size]``.

    Keycode embedding ⊕ timings → linear → + learned positions → pre-norm encoder layers with
    padded keys masked out of attention → mean over real keys → LayerNorm → linear.
    """

    def __init__(
        self,
        features: Sequence[str] = DEFAULT_FEATURES,
        embedding_size: int = 128,
        d_model: int = 128,
        heads: int = 4,
        layers: int = 2,
        feedforward: int = 256,
        dropout: float = 0.1,
        max_len: int = 512,
    ) -> None:
        super().__init__()
        self.embedding_size = embedding_size  # read by evaluation for empty batches
        self.input = KeystrokeInput(features, keycode_dim=16)
        self.project_in = nn.Linear(self.input.out_features, d_model)
        self.positions = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, feedforward, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.project_out = nn.Linear(d_model, embedding_size)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = features.shape[1]
        if length > len(self.positions):
            raise ValueError(f"sessions of {length} keys exceed this model's max_len {len(self.positions)}")
        h = self.project_in(self.input(zero_padding(features, mask))) + self.positions[:length]
        h = self.encoder(h, src_key_padding_mask=~attendable(mask))
        return self.project_out(self.norm(masked_mean(h, mask)))
