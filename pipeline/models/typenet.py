"""TypeNet-style baseline (Acien et al.): two LSTM layers with batch norm and dropout between."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.data.features import DEFAULT_FEATURES
from pipeline.models.layers import MaskedBatchNorm, run_rnn


class TypeNet(nn.Module):
    """``forward(features [B, L, F], mask [B, L]) → embeddings [B, embedding_size]``.

    Features (keycode / 255 included) go in as they come from the loader; the embedding is the
    second LSTM's state after the last real key, projected when ``embedding_size ≠ hidden``.
    """

    def __init__(
        self,
        features: Sequence[str] = DEFAULT_FEATURES,
        embedding_size: int = 128,
        hidden: int = 128,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.embedding_size = embedding_size  # read by evaluation for empty batches
        self.input_norm = MaskedBatchNorm(len(tuple(features)))
        self.lstm1 = nn.LSTM(len(tuple(features)), hidden, batch_first=True)
        self.between_norm = MaskedBatchNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.lstm2 = nn.LSTM(hidden, hidden, batch_first=True)
        self.project = nn.Identity() if embedding_size == hidden else nn.Linear(hidden, embedding_size)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, _ = run_rnn(self.lstm1, self.input_norm(features, mask), mask)
        _, last = run_rnn(self.lstm2, self.dropout(self.between_norm(h, mask)), mask)
        return self.project(last)
