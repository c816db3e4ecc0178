"""Set2set loss (Type2Branch's, docs/design.md §3): within-set vs cross-set triplet hinge plus a
penalty that keeps every set's radius near the mean radius.

    L = mean over all (a, p, n) of max(0, d(a, p) − d(a, n) + margin)  +  β · mean_i |r_i / r̄ − 1|

with (a, p) two samples of the same label, n a sample of another label, d the Euclidean
distance, r_i the mean distance of set i's samples to their centroid (sets of ≥ 2 samples), and
r̄ the mean radius. Margin 1.5, β = 0.05.

All N·P·Q triplets are counted without building them: per anchor, the negatives' distances are
sorted once, and for each positive the hinge sum over negatives is ``c·(d_ap + m) − S_c`` where
``c`` is how many negatives lie below ``d_ap + m`` and ``S_c`` their prefix sum — O(N² log N)
time and O(N²) memory, exact, for labels in any order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Set2SetLoss(nn.Module):
    """``loss(embeddings [N, D], labels [N]) → scalar``."""

    def __init__(self, margin: float = 1.5, beta: float = 0.05) -> None:
        super().__init__()
        self.margin, self.beta = margin, beta

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.triplet_term(embeddings, labels) + self.beta * self.radius_term(embeddings, labels)

    def triplet_term(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        distance = torch.cdist(embeddings, embeddings)
        same = labels[:, None] == labels[None, :]
        positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        negatives, _ = torch.sort(distance.masked_fill(same, float("inf")), dim=1)
        prefix = F.pad(torch.cumsum(negatives.masked_fill(negatives.isinf(), 0.0), dim=1), (1, 0))
        shifted = distance + self.margin
        below = torch.searchsorted(negatives.detach(), shifted.detach().contiguous())
        hinge = below.to(distance.dtype) * shifted - prefix.gather(1, below)
        triplets = (positive.sum(1) * (~same).sum(1)).sum()
        if triplets == 0:
            return embeddings.sum() * 0.0
        return (hinge * positive).sum() / triplets

    def radius_term(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _, index = torch.unique(labels, return_inverse=True)
        counts = torch.bincount(index).to(embeddings.dtype)
        sums = embeddings.new_zeros(len(counts), embeddings.shape[1]).index_add(0, index, embeddings)
        centroids = sums / counts[:, None]
        spread = torch.linalg.vector_norm(embeddings - centroids[index], dim=1)
        radii = torch.zeros_like(counts).index_add(0, index, spread) / counts
        radii = radii[counts >= 2]
        mean = radii.mean() if len(radii) else radii.sum()
        if len(radii) == 0 or mean == 0:
            return embeddings.sum() * 0.0
        return (radii / mean - 1).abs().mean()
