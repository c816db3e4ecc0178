"""The bridge to autograd: sums over pairs as one differentiable function of the embeddings.

Why a hand-written backward: autograd through the pairs would keep every per-pair temporary of
every block alive until backward, which is the ``N × N`` memory the blocks exist to avoid. The
loss is a scalar function of a few global sums over pairs, so backward needs only the sums'
gradients: it makes one more pass over the blocks, recomputes each pair's coefficient
``∂L/∂distance`` from them, and turns each block's coefficients into the embeddings' gradient
with two matmuls (``pairs._PairSet.gradient``).

Sharded pairs (``rows=``) keep the gradients of one process holding the batch:

1. The loss is a function of the global sums ``S = Σ_r S_r``, so ``∂L/∂S`` is the same on every
   rank, and rank r's backward yields ``g_r = ∂L/∂S · ∂S_r/∂G``: its own pairs' share of the
   gradient, w.r.t. every row of the gathered batch ``G`` (``∂L/∂d``, a sum over pairs, is
   all-reduced inside backward, so backward is a collective: every rank runs it).
2. The all-gather's backward (a sum reduce-scatter) gives rank r's local rows ``Σ_r' g_r'``, the
   full ``∂L/∂G`` of those rows, once (a replicated loss gives them ``W`` times that).
3. DDP/DeepSpeed divide the all-reduced parameter gradients by ``W``, so a sharded loss carries a
   gradient scale of ``W = group size`` (``_ScaleGradient``: value unchanged): parameter gradients
   then equal one process holding ``G``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.losses.eer.pairs import _PairSet
from pipeline.losses.eer.soft_terms import _SoftTerms

_RATE, _AREA, _DISTANCE = 0, 1, 2  # columns of the sums
_SLOPE = 3  # the sums' slopes in d follow: _SLOPE + _RATE, _SLOPE + _AREA


@dataclass(frozen=True)
class _Summands:
    """What one pass over the pairs sums, per side: soft steps, area terms (on the sides the loss
    keeps: an FMR target's loss has no impostor term, and most pairs are impostors), their
    slopes, distances."""

    rates: bool = True
    area: tuple[bool, bool] = (False, False)  # genuine, impostor
    slopes: bool = False
    distances: bool = False


class _PairSums(torch.autograd.Function):
    """Global sums over pairs at the thresholds ``d`` (``[P]``, one per operating point):
    ``sums[side, point, (rate, area, distance)]`` and ``slopes``.

    ``slopes[side, point, (rate, area)]`` are the sums' derivatives in that point's ``d`` (no
    gradient: the implicit threshold gradient needs their values only). Backward makes one more
    pass over the blocks: each pair's coefficient ``Σ_point Σ_s ∂L/∂sum_s · ∂term_s/∂distance``
    (recomputed, never stored) goes into that block's coefficient slab, so several points cost
    one pass of elementwise terms each but one pair of block matmuls in all; ``∂L/∂d`` is a sum
    over pairs, all-reduced so that every rank continues with the global value. The thresholds
    reach the per-pair terms as Python numbers (one read each way).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, vectors: torch.Tensor, d: torch.Tensor, pairs: _PairSet, terms: _SoftTerms, summands: _Summands
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ats = d.tolist()

        def point_sums(side: int, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([_side_sums(terms, summands, side, x, at) for at in ats])

        totals = pairs.collective.reduce(pairs.totals(point_sums, vectors.new_zeros(2, len(ats), 5)))
        ctx.save_for_backward(d)
        ctx.pairs, ctx.terms, ctx.summands = pairs, terms, summands
        sums, slopes = totals[..., :_SLOPE].clone(), totals[..., _SLOPE:].clone()
        ctx.mark_non_differentiable(slopes)
        return sums, slopes

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_sums: torch.Tensor, _grad_slopes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, None, None, None]:
        (d,) = ctx.saved_tensors
        ats, need_d = d.tolist(), ctx.needs_input_grad[1]

        def weights(side: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            each = [
                _side_weights(ctx.terms, ctx.summands, side, x, at, grad_sums[side, point], need_d)
                for point, at in enumerate(ats)
            ]
            return functools.reduce(torch.Tensor.add_, [w for w, _ in each]), torch.stack([s for _, s in each])

        grad_vectors, grad_d = ctx.pairs.gradient(weights, len(ats))
        if not need_d:
            return grad_vectors, None, None, None, None
        return grad_vectors, ctx.pairs.collective.reduce(grad_d), None, None, None


def _side_sums(terms: _SoftTerms, summands: _Summands, side: int, x: torch.Tensor, d: float) -> torch.Tensor:
    """One side's sums over the distances ``x``: ``[rate, area, distance, ∂rate/∂d, ∂area/∂d]``,
    zero where ``summands`` leaves them out."""
    sums = [x.new_zeros(())] * 5
    if summands.rates:
        step, along_x = terms.step(x, d, side, derivative=summands.slopes)
        sums[_RATE] = step.sum()
        if summands.slopes:
            assert along_x is not None  # asked for with derivative=True
            sums[_SLOPE + _RATE] = -along_x.sum()  # ∂/∂d = −∂/∂x
    if summands.area[side]:
        term, along_x = terms.area(x, d, side, derivative=summands.slopes)
        sums[_AREA] = term.sum()
        if summands.slopes:
            assert along_x is not None  # asked for with derivative=True
            sums[_SLOPE + _AREA] = torch.dot(x, along_x) / -d  # ∂/∂d = −(x/d)·∂/∂x
    if summands.distances:
        sums[_DISTANCE] = x.sum()
    return torch.stack(sums)


def _side_weights(
    terms: _SoftTerms, summands: _Summands, side: int, x: torch.Tensor, d: float, grad: torch.Tensor, need_d: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ``∂L/∂distance`` of one side's distances ``x``, and (if ``need_d``) their share of ``∂L/∂d``."""
    parts, along_d = [], x.new_zeros(())
    if summands.rates:
        _, along_x = terms.step(x, d, side, derivative=True)
        assert along_x is not None  # asked for with derivative=True
        parts.append(along_x.mul_(grad[_RATE]))
        if need_d:
            along_d -= along_x.sum()  # ∂/∂d = −∂/∂x
    if summands.area[side]:
        _, along_x = terms.area(x, d, side, derivative=True)
        assert along_x is not None  # asked for with derivative=True
        parts.append(along_x.mul_(grad[_AREA]))
        if need_d:
            along_d -= torch.dot(x, along_x) / d  # ∂/∂d = −(x/d)·∂/∂x
    weight = functools.reduce(torch.Tensor.add_, parts) if parts else torch.zeros_like(x)
    return weight.add_(grad[_DISTANCE]) if summands.distances else weight, along_d


class _ScaleGradient(torch.autograd.Function):
    """Identity in value; multiplies the gradient by ``scale``: a sharded loss's ``W`` (step 3 above)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None
