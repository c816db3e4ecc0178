"""Type2Branch (the KVC winner), ported to PyTorch from its description in docs/design.md §3.

keycode → Embedding(256, 8) ⊕ timing features → BN, then two branches:

* recurrent: temporal attention → BiGRU(W) → BN → dropout → self-attention → BiGRU(W) → BN
  → dropout (the final states of the second BiGRU, 2W);
* convolutional: temporal attention → 3 × [Conv1D(k=6; F, 2F, 4F filters, ReLU) → BN →
  dropout → squeeze-excitation] → global average pool (4F);

concatenated → Dense(W, ReLU) → BN → dropout → Dense(embedding_size).

The description names the layers but not their internals; the readings taken here: temporal
attention is a learned per-key softmax weighting over the real keys; the "structured
self-attention" between the BiGRUs is multi-head self-attention over the keys (sequence in,
sequence out, as the second BiGRU needs); convolutions use 'same' padding (zeros beyond a
session's last key). Every layer is mask-aware (see :mod:`pipeline.models.layers`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.data.features import DEFAULT_FEATURES
from pipeline.models.layers import (
    KeystrokeInput,
    MaskedBatchNorm,
    SqueezeExcitation,
    TemporalAttention,
    attendable,
    masked_mean,
    run_rnn,
    zero_padding,
)

SIZES: dict[str, dict[str, float]] = {
    "small": {"width": 256, "filters": 128, "dropout": 0.5},
    "large": {"width": 512, "filters": 1024, "dropout": 0.5},
}


class _ConvBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.pad = nn.ConstantPad1d(((kernel - 1) // 2, kernel // 2), 0.0)  # 'same' for even kernels
        self.conv = nn.Conv1d(channels_in, channels_out, kernel)
        self.norm = MaskedBatchNorm(channels_out)
        self.dropout = nn.Dropout(dropout)
        self.excite = SqueezeExcitation(channels_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Zeroing after the convolution keeps padding at 0, so the next layer's window over the
        # end of a session sees zeros whatever the padded length: 'same' padding, exactly.
        x = zero_padding(torch.relu(self.conv(self.pad(x.transpose(1, 2))).transpose(1, 2)), mask)
        return self.excite(self.dropout(self.norm(x, mask)), mask)


class Type2Branch(nn.Module):
    """``forward(features [B, L, F], mask [B, L]) → embeddings [B, embedding_size]``."""

    def __init__(
        self,
        features: Sequence[str] = DEFAULT_FEATURES,
        embedding_size: int = 256,
        width: int = 256,
        filters: int = 128,
        dropout: float = 0.5,
        kernel: int = 6,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.embedding_size = embedding_size  # read by evaluation for empty batches
        self.input = KeystrokeInput(features, keycode_dim=8)
        channels = self.input.out_features
        self.input_norm = MaskedBatchNorm(channels)
        self.recurrent_attention = TemporalAttention(channels)
        self.gru1 = nn.GRU(channels, width, batch_first=True, bidirectional=True)
        self.gru1_norm = MaskedBatchNorm(2 * width)
        self.self_attention = nn.MultiheadAttention(2 * width, heads, batch_first=True)
        self.gru2 = nn.GRU(2 * width, width, batch_first=True, bidirectional=True)
        self.gru2_norm = nn.BatchNorm1d(2 * width)
        self.conv_attention = TemporalAttention(channels)
        sizes = [channels, filters, 2 * filters, 4 * filters]
        self.convs = nn.ModuleList(
            _ConvBlock(a, b, kernel, dropout) for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(
            nn.Linear(2 * width + 4 * filters, width), nn.ReLU(), nn.BatchNorm1d(width),
            nn.Dropout(dropout), nn.Linear(width, embedding_size),
        )

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(self.input(zero_padding(features, mask)), mask)
        return self.head(torch.cat([self._recurrent(x, mask), self._convolutional(x, mask)], dim=-1))

    def _recurrent(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, _ = run_rnn(self.gru1, self.recurrent_attention(x, mask), mask)
        h = self.dropout(self.gru1_norm(h, mask))
        h, _ = self.self_attention(h, h, h, key_padding_mask=~attendable(mask), need_weights=False)
        _, last = run_rnn(self.gru2, zero_padding(h, mask), mask)
        return self.dropout(self.gru2_norm(last))

    def _convolutional(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.conv_attention(x, mask)
        for block in self.convs:
            h = block(h, mask)
        return masked_mean(h, mask)
