"""The threshold ``d*`` of an operating point: its search, its gradient, and a persistent one.

The search finds the root of ``F(d) = a(d) − b(d)``, positive while ``d`` is too low:
``FRR_s − FAR_s`` for the EER, ``t − FAR_s`` for an FMR target ``t``, ``FRR_s − t`` for an FNMR
target. Why two searches:

- **Bisection** (``threshold_grad="implicit"`` or ``"detached"``): a hard bisection without
  autograd on a fine histogram of the pair distances when the batch has many pairs, so a step
  costs the grid, not the pairs. It keeps ``d`` on the device (``torch.where`` picks the half),
  so the host never waits for a step. The implicit gradient is then exact at the root:
  ``∂d*/∂θ = −(∂F/∂θ)/(∂F/∂d)`` (``_implicit_shift``), at the cost of one forward and one
  backward pass over the pairs in all.
- **Unrolled** (``threshold_grad="unrolled"``): the authors' smooth binary search
  (``l = 0.5·mean L``, ``r = 1.5·mean I``, soft moves ``c = exp(k·(rate − max))`` on percent
  rates), differentiated step by step: one forward and one backward pass per step.

A persistent threshold (``RunningThreshold``) averages ``d*`` across training calls: at a low FMR
target a batch's ``d*`` is set by a few dozen impostor pairs and jumps from batch to batch
(docs/design.md, "Persistent threshold").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.losses.eer.autograd import _DISTANCE, _RATE, _PairSums, _Summands
from pipeline.losses.eer.pairs import _GENUINE, _IMPOSTOR, _PairSet
from pipeline.losses.eer.soft_terms import _SoftTerms

_BINS_PER_UNIT_SHARPNESS = 64  # histogram bins per 1/k of distance in the bisection
_MAX_BINS = 1 << 22

Points = list[tuple[torch.Tensor, torch.Tensor]]  # each side's (distances, counts)


@dataclass(frozen=True)
class _ThresholdSearch:
    """The search for the threshold of one kind of operating point, ``"eer"``, ``"fmr"`` or ``"fnmr"``."""

    kind: str
    steps: int
    terms: _SoftTerms

    def equation(self, frr: torch.Tensor, far: torch.Tensor, target: float | torch.Tensor) -> torch.Tensor:
        """``F = a − b``: positive while the threshold is too low, decreasing in ``d``.

        ``target`` is the point's rate; 0 drops it: applied to the rates' slopes that gives ``∂F/∂d``.
        """
        if self.kind == "fmr":
            return target - far
        if self.kind == "fnmr":
            return frr - target
        return frr - far

    def bisection(self, points: Points, pairs: _PairSet, target: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(d*, the last midpoint): a hard bisection on the soft rates of the (binned) points for
        the ``target`` rate, without autograd."""
        weights = [counts / size for (_, counts), size in zip(points, pairs.sizes, strict=True)]

        def rate(side: int, d: torch.Tensor) -> torch.Tensor:
            return (weights[side] * self.terms.step(points[side][0], d, side)[0]).sum()

        left, right = pairs.low.clone(), pairs.high.clone()
        midpoint = (left + right) / 2
        for _ in range(self.steps):
            midpoint = (left + right) / 2
            too_low = self.equation(rate(_GENUINE, midpoint), rate(_IMPOSTOR, midpoint), target) > 0
            left = torch.where(too_low, midpoint, left)
            right = torch.where(too_low, right, midpoint)
        return (left + right) / 2, midpoint

    def unrolled(self, vectors: torch.Tensor, pairs: _PairSet, target: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(d*, the last midpoint): the authors' smooth binary search for the ``target`` rate,
        differentiable through every step (one pass each)."""
        distances = _Summands(rates=False, distances=True)
        sums, _ = _PairSums.apply(vectors, vectors.new_zeros(1), pairs, self.terms, distances)
        means = sums[:, 0, _DISTANCE] / pairs.sizes
        left, right = 0.5 * means[_GENUINE], 1.5 * means[_IMPOSTOR]
        midpoint = (left + right) / 2
        for _ in range(self.steps):
            midpoint = (left + right) / 2
            sums, _ = _PairSums.apply(vectors, midpoint.reshape(1), pairs, self.terms, _Summands())
            rates = sums[:, 0, _RATE] / pairs.sizes
            push_right, push_left = self._pressures(100 * rates[_GENUINE], 100 * rates[_IMPOSTOR], target)
            top = torch.maximum(push_right, push_left)
            move_left = torch.exp(self.terms.k * (push_right - top))
            move_right = torch.exp(self.terms.k * (push_left - top))
            left = left * (1 - move_left) + midpoint * move_left
            right = right * (1 - move_right) + midpoint * move_right
        return (left + right) / 2, midpoint

    def _pressures(
        self, frr_pct: torch.Tensor, far_pct: torch.Tensor, target: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) in percent: the search raises ``d`` while ``a > b``."""
        target_pct = frr_pct.new_full((), 100 * target)
        if self.kind == "fmr":
            return target_pct, far_pct
        if self.kind == "fnmr":
            return frr_pct, target_pct
        return frr_pct, far_pct


def _search_points(pairs: _PairSet, k: float) -> Points:
    """Each side's distances as (points, counts) for the bisection and the stats.

    When there are more pairs than a grid of ``_BINS_PER_UNIT_SHARPNESS`` bins per ``1/k``
    needs, the pairs are binned (one pass; each pair moves by at most half a bin,
    ``1/(2·64·k)``, far below the soft step), so each search step costs the grid, not the
    pairs; otherwise the points are the exact distances, gathered from every rank. The grid's
    size is a shape, so the host reads the distance range once here.
    """
    span = float(pairs.high - pairs.low)
    bins = math.ceil(span * k * _BINS_PER_UNIT_SHARPNESS) + 1
    exact = [bins >= count or bins > _MAX_BINS for count in pairs.counts]
    if not all(exact):
        width = span / (bins - 1)
        histograms = pairs.histograms(pairs.low, width, bins).to(pairs.low.dtype)
        centers = pairs.low + width * torch.arange(bins, dtype=histograms.dtype, device=histograms.device)
    points = []
    for side, exact_side in enumerate(exact):
        distances = pairs.concat(side) if exact_side else centers
        points.append((distances, torch.ones_like(distances) if exact_side else histograms[side]))
    return points


def _implicit_shift(equation: torch.Tensor, equation_slope: torch.Tensor) -> torch.Tensor:
    """Zero in value; gradient ``−(∂F/∂θ)/(∂F/∂d)``, the derivative of the root of ``F = 0`` (per point).

    Where no pair is near a threshold the slope vanishes, and so does ``∂F/∂θ``: that point's
    shift is then dropped instead of dividing by zero.
    """
    slope = equation_slope.detach()
    flat = slope.abs() < 1e-12
    shift = -(equation - equation.detach()) / torch.where(flat, torch.ones_like(slope), slope)
    return torch.where(flat, torch.zeros_like(shift), shift)


class RunningThreshold:
    """A persistent threshold ``d̄ ← m·d̄ + (1−m)·d*``: a float64 scalar, NaN until the first
    training call sets it to that batch's ``d*``; a run's checkpoint part, so a resumed run
    continues it bit for bit.

    Not a buffer of the loss module: buffers follow the module's dtype (``.to(torch.bfloat16)``,
    DeepSpeed's fp16/bf16 blocks), and in bf16 the update of a 0.99 average stalls (its steps fall
    below bf16's resolution of the threshold); float64 keeps those small steps over long runs.
    """

    def __init__(self, momentum: float) -> None:
        self.momentum = float(momentum)
        self.value = torch.full((), math.nan, dtype=torch.float64)

    def blend(self, batch_threshold: torch.Tensor, keep: bool) -> torch.Tensor:
        """``m·d̄ + (1−m)·d*`` (``d*`` alone the first time), as a constant in ``d*``'s dtype;
        ``keep``: it becomes the new ``d̄``."""
        batch = batch_threshold.detach().double()
        previous = self.value.to(batch.device)
        value = torch.where(previous.isnan(), batch, torch.lerp(batch, previous, self.momentum))
        if keep:
            self.value = value
        return value.to(batch_threshold.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]
