"""Mask-aware building blocks: padded keys never reach a real key's output, in training or not.

Every model takes ``features [B, L, F]`` and a prefix ``mask [B, L]`` (real keys first, as the
loader yields them). Padded positions are zeroed on entry and after every layer that could
write to them, batch statistics are taken over real keys only, recurrent layers run on packed
sequences (or, in ``bigru``, unpacked on the real keys in order and reversed in place), and
pooling averages real keys only — so an embedding does not depend on how much
padding follows a session or on what the padded positions contain.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.data.features import DEFAULT_FEATURES


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x * mask.unsqueeze(-1).to(x.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real keys: ``[B, L, C] → [B, C]`` (0 for a session with no key)."""
    count = mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
    return zero_padding(x, mask).sum(1) / count


def attendable(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` with key 0 opened for empty sessions, so attention over them stays finite."""
    return mask | (~mask.any(1, keepdim=True) & (torch.arange(mask.shape[1], device=mask.device) == 0))


class KeystrokeInput(nn.Module):
    """Keycode → learned embedding, concatenated with the other (timing) features.

    The loader encodes keycodes as ``keycode / 255``; the integer code is recovered here. With
    no ``keycode`` feature the features pass through unchanged.
    """

    def __init__(self, features: Sequence[str] = DEFAULT_FEATURES, keycode_dim: int = 8) -> None:
        super().__init__()
        features = tuple(features)
        self.keycode_index = features.index("keycode") if "keycode" in features else None
        self.embedding = nn.Embedding(256, keycode_dim) if self.keycode_index is not None else None
        self.out_features = len(features) + (keycode_dim - 1 if self.embedding is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.keycode_index
        if self.embedding is None or k is None:  # both are set together, or neither
            return x
        codes = torch.round(x[..., k] * 255).clamp(0, 255).long()
        return torch.cat([self.embedding(codes), x[..., :k], x[..., k + 1 :]], dim=-1)


class MaskedBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of ``[B, L, C]`` whose batch statistics use real keys only."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.training:
            out = torch.zeros_like(x)
            out[mask] = super().forward(x[mask])
            return out
        return zero_padding(super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape), mask)


class TemporalAttention(nn.Module):
    """Scores every key, softmax over the real keys, and reweights them (mean weight 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.score = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(x).squeeze(-1)  # bf16 under autocast even when x is fp32
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=1) * mask.sum(1, keepdim=True).to(scores.dtype)
        return zero_padding(x * weights.unsqueeze(-1), mask)


class SqueezeExcitation(nn.Module):
    """Channel gates from the mean over real keys (Hu et al.), on ``[B, L, C]``."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.gate = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x * self.gate(masked_mean(x, mask)).unsqueeze(1)


def run_rnn(rnn: nn.RNNBase, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``rnn`` (batch_first) over the real keys only.

    Returns the per-key outputs ``[B, L, H·dirs]`` (0 on padding) and the last layer's final
    state ``[B, H·dirs]`` (forward: after the last real key; backward: after the first).
    """
    lengths = mask.sum(1).clamp(min=1).cpu()
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    outputs, state = rnn(packed)
    outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=x.shape[1])
    hidden = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c)
    directions = 2 if rnn.bidirectional else 1
    return outputs, torch.cat(list(hidden[-directions:]), dim=-1)
