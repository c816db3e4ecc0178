"""EERLoss: a smooth, arbitrarily accurate surrogate of a batch's Equal Error Rate.

For a batch of embeddings, every unordered pair of samples is either *genuine* (same label,
distances ``L``) or *impostor* (different labels, distances ``I``). With sharpness ``k``:

    FRR_s(d) = mean_L tanh(k · max(0, ℓ − d))      soft false-reject rate at threshold d
    FAR_s(d) = mean_I tanh(k · max(0, d − i))      soft false-accept rate at threshold d

A search finds the threshold ``d*`` of the requested DET operating point — the root of

    target="eer"            FRR_s(d) = FAR_s(d)
    target={"fmr": t}       FAR_s(d) = t        (we then minimise the FNMR there)
    target={"fnmr": t}      FRR_s(d) = t        (we then minimise the FMR there)

and the loss is evaluated at ``d*``:

    variant="direct"   EER target: (FAR_s + FRR_s)/2;  FMR target: FRR_s;  FNMR target: FAR_s
    variant="area"     100 · [ P_β( max(ε, (ℓ − (1−α)d*)/d*) ) + P_β( max(ε, ((1+α)d* − i)/d*) ) ]
                       with the power mean P_β(x) = (mean x^β)^(1/β); an FMR target keeps only the
                       genuine term, an FNMR target only the impostor term (``both_sides=True``
                       keeps both: the pairs on the wrong side of d* move whichever side they are).

Both are in percent, as in the authors' code. As ``k`` and the search precision grow, the direct
EER loss converges to the exact EER of the batch (tested to 0.1 percentage points).

How the gradient reaches the threshold (``threshold_grad``):

* ``"implicit"`` (default): the search runs without autograd, on a fine histogram of the pair
  distances when the batch has many pairs (one pass over them instead of one per step); then ``d*`` is given the exact
  gradient of the root by the implicit-function theorem, ``∂d*/∂θ = −(∂F/∂θ)/(∂F/∂d)`` with
  ``F = a(d) − b(d)`` the search equation. Cost: one forward and one backward pass over the pairs.
* ``"unrolled"``: the authors' smooth binary search (``l = 0.5·mean L``, ``r = 1.5·mean I``,
  soft moves ``c = exp(k·(rate − max))`` on percent rates), differentiated step by step.
* ``"detached"``: ``d*`` is a constant; only the pairs move.

Recipe options (issue 8, measured in ``docs/research-notes.md``):

* ``normalize=True`` (default) L2-normalises the embeddings before the distance, as the
  pytorch-metric-learning triplet baselines do: pair distances then live in ``[0, 2]``, so ``k``
  has a fixed meaning relative to them instead of drifting with the embedding norm. It trained
  to a lower held-out EER than raw embeddings at every checkpoint; ``normalize=False`` gives the
  authors' raw-embedding loss.
* ``floor="softplus"`` replaces the area variant's hard floor ``max(ε, x)`` by ``τ·softplus(x/τ)``
  (``x`` is the signed, ``d*``-relative distance to the threshold): correct pairs within a few
  ``τ`` of ``d*`` keep a gradient, so a batch that is already separated at ``d*`` still trains
  (with the hard floor only the pair that ``d*`` lands on does). The default: it lowered the
  held-out EER in all three paired runs of the study; ``floor="hard"`` is the authors' form.

``evaluate_at="midpoint"`` reproduces a quirk of the authors' code, which evaluates the rates at
the last midpoint of the search instead of at the final ``d*``; the default evaluates at ``d*``.

Memory: distances come from one ``N×N`` Gram matrix (never ``N×N×D``) and per-pair soft rates
are recomputed in backward instead of stored, so ``N = 8192, D = 256`` runs in well under 2 GB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np
import torch
import torch.nn.functional as F

Target = Literal["eer"] | Mapping[str, float]

_EPS_SQUARED_DISTANCE = 1e-12  # keeps sqrt differentiable for coincident embeddings
_BINS_PER_UNIT_SHARPNESS = 64  # histogram bins per 1/k of distance in the implicit search
_MAX_BINS = 1 << 22


@dataclass(frozen=True)
class EERStats:
    """Diagnostics of one loss call (fractions, not percent), for logging."""

    threshold: float  # d*, in distance units
    soft_far: float  # FAR_s(d*)
    soft_frr: float  # FRR_s(d*)
    exact_eer: float  # EER of the batch's pair distances by the official formula
    genuine_pairs: int
    impostor_pairs: int


class _SoftRate(torch.autograd.Function):
    """``mean_j tanh(k · max(0, s·(x_j − d)))`` and its slope in ``d``.

    Nothing per pair is saved: backward recomputes the pairs' terms, which keeps the memory of a
    search over tens of millions of pairs at a few vectors. The slope is returned without a
    gradient; the implicit threshold gradient needs its value only.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, d: torch.Tensor, k: float, sign: float):  # type: ignore[override]
        z = (x - d).mul_(sign).clamp_min_(0).mul_(k)
        t = torch.tanh(z)
        rate = t.mean()
        dt_dz = torch.where(z > 0, 1 - t * t, torch.zeros_like(t))
        slope = -sign * k * dt_dz.mean()
        ctx.save_for_backward(x, d)
        ctx.k, ctx.sign = k, sign
        ctx.mark_non_differentiable(slope)
        return rate, slope

    @staticmethod
    def backward(ctx, grad_rate: torch.Tensor, _grad_slope: torch.Tensor):  # type: ignore[override]
        x, d = ctx.saved_tensors
        z = (x - d).mul_(ctx.sign).clamp_min_(0).mul_(ctx.k)
        t = torch.tanh(z)
        per_pair = torch.where(z > 0, 1 - t * t, torch.zeros_like(t))
        per_pair.mul_(grad_rate * ctx.sign * ctx.k / x.numel())
        grad_d = -per_pair.sum() if ctx.needs_input_grad[1] else None
        return per_pair, grad_d, None, None


def soft_rate(x: torch.Tensor, d: torch.Tensor, k: float, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft error rate of pair distances ``x`` at threshold ``d`` (sign +1: FRR, −1: FAR)."""
    return _SoftRate.apply(x, d, k, sign)


def pair_distances(
    embeddings: torch.Tensor, labels: torch.Tensor, distance: str = "euclidean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Genuine and impostor distances of every unordered pair, from one Gram matrix."""
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"expected embeddings [N, D] and labels [N], got {tuple(embeddings.shape)} "
            f"and {tuple(labels.shape)}"
        )
    upper = torch.ones(len(labels), len(labels), dtype=torch.bool, device=labels.device).triu_(1)
    same = labels[:, None] == labels[None, :]
    if distance == "cosine":
        unit = F.normalize(embeddings, dim=1)
        dist = 1 - unit @ unit.T
        genuine, impostor = dist[same & upper], dist[~same & upper]
    elif distance == "euclidean":
        squared_norms = embeddings.pow(2).sum(1)
        squared = squared_norms[:, None] + squared_norms[None, :] - 2 * embeddings @ embeddings.T
        genuine = squared[same & upper].clamp_min(_EPS_SQUARED_DISTANCE).sqrt()
        impostor = squared[~same & upper].clamp_min(_EPS_SQUARED_DISTANCE).sqrt()
    else:
        raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
    if genuine.numel() == 0 or impostor.numel() == 0:
        raise ValueError(
            f"EERLoss needs at least one genuine and one impostor pair; the batch has "
            f"{genuine.numel()} genuine and {impostor.numel()} impostor pairs (labels: "
            f"{labels.unique().numel()} distinct in {len(labels)} samples)"
        )
    return genuine, impostor


class EERLoss(torch.nn.Module):
    """Smooth EER (or any DET operating point) of a batch, ``loss(embeddings, labels)``.

    Args:
        variant: ``"area"`` (authors' recommended form) or ``"direct"`` (the soft error rate).
        distance: ``"euclidean"`` or ``"cosine"`` (``1 − cos``).
        k: sharpness of the soft step, in 1/distance units.
        search_steps: steps of the threshold search.
        target: ``"eer"``, ``{"fmr": t}`` or ``{"fnmr": t}`` (rates as fractions).
        alpha, beta, eps: margin, power and floor of the area variant.
        threshold_grad: ``"implicit"``, ``"unrolled"`` or ``"detached"`` (see the module doc).
        evaluate_at: ``"threshold"`` (at d*) or ``"midpoint"`` (authors' last midpoint).
        normalize: L2-normalise the embeddings first (the default: it won in the issue-8 study).
        floor, tau: the area variant's floor, ``"hard"`` ``max(ε, x)`` or ``"softplus"`` ``τ·softplus(x/τ)``.
        both_sides: with an FMR or FNMR target, keep both area terms instead of only the one the
            target does not fix (the authors' form; docs/results.md §5 measures both).
    """

    def __init__(
        self,
        variant: Literal["area", "direct"] = "area",
        distance: Literal["euclidean", "cosine"] = "euclidean",
        k: float = 100.0,
        search_steps: int = 16,
        target: Target = "eer",
        alpha: float = 0.0,
        beta: float = 0.85,
        eps: float = 1e-7,
        threshold_grad: Literal["implicit", "unrolled", "detached"] = "implicit",
        evaluate_at: Literal["threshold", "midpoint"] = "threshold",
        normalize: bool = True,
        floor: Literal["hard", "softplus"] = "softplus",
        tau: float = 0.05,
        both_sides: bool = False,
    ) -> None:
        super().__init__()
        if variant not in ("area", "direct"):
            raise ValueError(f"variant must be 'area' or 'direct', got {variant!r}")
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
        if threshold_grad not in ("implicit", "unrolled", "detached"):
            raise ValueError(f"threshold_grad must be implicit, unrolled or detached, got {threshold_grad!r}")
        if evaluate_at not in ("threshold", "midpoint"):
            raise ValueError(f"evaluate_at must be 'threshold' or 'midpoint', got {evaluate_at!r}")
        if floor not in ("hard", "softplus"):
            raise ValueError(f"floor must be 'hard' or 'softplus', got {floor!r}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0 < beta < 2:
            raise ValueError(f"beta must lie in (0, 2), got {beta}")
        if k <= 0 or search_steps < 1:
            raise ValueError(f"k must be > 0 and search_steps >= 1, got k={k}, search_steps={search_steps}")
        self.variant, self.distance = variant, distance
        self.k, self.search_steps = float(k), int(search_steps)
        self.target_kind, self.target_rate = _parse_target(target)
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)
        self.threshold_grad, self.evaluate_at = threshold_grad, evaluate_at
        self.normalize, self.floor, self.tau = bool(normalize), floor, float(tau)
        self.both_sides = bool(both_sides)

    def extra_repr(self) -> str:
        target = "eer" if self.target_kind == "eer" else f"{self.target_kind}={self.target_rate:g}"
        return (
            f"variant={self.variant}, distance={self.distance}, k={self.k:g}, "
            f"search_steps={self.search_steps}, target={target}, threshold_grad={self.threshold_grad}, "
            f"alpha={self.alpha:g}, beta={self.beta:g}, normalize={self.normalize}, floor={self.floor}, "
            f"both_sides={self.both_sides}"
        )

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, return_stats: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, EERStats]:
        if embeddings.dtype not in (torch.float32, torch.float64):
            embeddings = embeddings.float()  # bf16/fp16 embeddings: the search needs fp32 resolution
        if self.normalize:
            embeddings = F.normalize(embeddings, dim=1)
        genuine, impostor = pair_distances(embeddings, labels, self.distance)
        if self.threshold_grad == "unrolled":
            threshold, midpoint = self._unrolled_search(genuine, impostor)
        else:
            with torch.no_grad():
                threshold, midpoint = self._bisection_search(genuine.detach(), impostor.detach())
        at = midpoint if self.evaluate_at == "midpoint" else threshold

        frr, frr_slope = soft_rate(genuine, at, self.k, +1.0)
        far, far_slope = soft_rate(impostor, at, self.k, -1.0)
        if self.threshold_grad == "implicit":
            # d* = d + (0 in value) carrying −(∂F/∂θ)/(∂F/∂d); rates follow to first order.
            equation = self._equation(frr, far)
            equation_slope = self._equation(frr_slope, far_slope)
            shift = _implicit_shift(equation, equation_slope)
            at = at + shift
            frr, far = frr + frr_slope * shift, far + far_slope * shift

        loss = self._direct(frr, far) if self.variant == "direct" else self._area(genuine, impostor, at)
        if not return_stats:
            return loss
        return loss, self._stats(genuine, impostor, at, frr, far)

    # -- the threshold search -------------------------------------------------------------------
    def _equation(self, frr: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
        """``F = a − b``: positive while the threshold is too low, decreasing in ``d``."""
        if self.target_kind == "fmr":
            return self.target_rate - far
        if self.target_kind == "fnmr":
            return frr - self.target_rate
        return frr - far

    def _bisection_search(
        self, genuine: torch.Tensor, impostor: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard bisection on the soft rates, without autograd.

        When there are more pairs than a grid of ``_BINS_PER_UNIT_SHARPNESS`` bins per ``1/k``
        needs, the pairs are first binned (one pass), so each step costs the grid, not the pairs.
        """
        low = torch.minimum(genuine.min(), impostor.min())
        high = torch.maximum(genuine.max(), impostor.max())
        genuine_points, genuine_weights = _weighted_points(genuine, low, high, self.k)
        impostor_points, impostor_weights = _weighted_points(impostor, low, high, self.k)

        def rate(points: torch.Tensor, weights: torch.Tensor, d: torch.Tensor, sign: float) -> torch.Tensor:
            return (weights * torch.tanh(self.k * ((points - d) * sign).clamp_min(0))).sum()

        left, right = low.clone(), high.clone()
        midpoint = (left + right) / 2
        for _ in range(self.search_steps):
            midpoint = (left + right) / 2
            frr = rate(genuine_points, genuine_weights, midpoint, +1.0)
            far = rate(impostor_points, impostor_weights, midpoint, -1.0)
            too_low = self._equation(frr, far) > 0
            left = torch.where(too_low, midpoint, left)
            right = torch.where(too_low, right, midpoint)
        return (left + right) / 2, midpoint

    def _unrolled_search(
        self, genuine: torch.Tensor, impostor: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The authors' smooth binary search, differentiable through every step."""
        left, right = 0.5 * genuine.mean(), 1.5 * impostor.mean()
        midpoint = (left + right) / 2
        for _ in range(self.search_steps):
            midpoint = (left + right) / 2
            frr, _ = soft_rate(genuine, midpoint, self.k, +1.0)
            far, _ = soft_rate(impostor, midpoint, self.k, -1.0)
            push_right, push_left = self._search_pressures(100 * frr, 100 * far)
            top = torch.maximum(push_right, push_left)
            move_left = torch.exp(self.k * (push_right - top))
            move_right = torch.exp(self.k * (push_left - top))
            left = left * (1 - move_left) + midpoint * move_left
            right = right * (1 - move_right) + midpoint * move_right
        return (left + right) / 2, midpoint

    def _search_pressures(self, frr_pct: torch.Tensor, far_pct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) in percent: the search raises ``d`` while ``a > b``."""
        target_pct = torch.as_tensor(100 * self.target_rate, dtype=frr_pct.dtype, device=frr_pct.device)
        if self.target_kind == "fmr":
            return target_pct, far_pct
        if self.target_kind == "fnmr":
            return frr_pct, target_pct
        return frr_pct, far_pct

    # -- the loss at the threshold --------------------------------------------------------------
    def _direct(self, frr: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
        if self.target_kind == "fmr":
            return 100 * frr
        if self.target_kind == "fnmr":
            return 100 * far
        return 100 * (frr + far) / 2

    def _area(self, genuine: torch.Tensor, impostor: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        terms = []
        if self.target_kind != "fnmr" or self.both_sides:
            terms.append(self._power_mean((genuine - (1 - self.alpha) * d) / d))
        if self.target_kind != "fmr" or self.both_sides:
            terms.append(self._power_mean(((1 + self.alpha) * d - impostor) / d))
        return 100 * sum(terms)

    def _power_mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.floor == "softplus":
            x = self.tau * F.softplus(x / self.tau)
        return x.clamp_min(self.eps).pow(self.beta).mean().pow(1 / self.beta)

    def _stats(
        self, genuine: torch.Tensor, impostor: torch.Tensor, d: torch.Tensor, frr: torch.Tensor, far: torch.Tensor
    ) -> EERStats:
        from pipeline.metrics import eer as exact_eer

        scores = -torch.cat([genuine, impostor]).detach().double().cpu().numpy()
        labels = np.r_[np.ones(genuine.numel()), np.zeros(impostor.numel())]
        value, _ = exact_eer(labels, scores)
        return EERStats(
            threshold=float(d.detach()),
            soft_far=float(far.detach()),
            soft_frr=float(frr.detach()),
            exact_eer=float(value),
            genuine_pairs=genuine.numel(),
            impostor_pairs=impostor.numel(),
        )


def _parse_target(target: Target) -> tuple[str, float]:
    if target == "eer":
        return "eer", 0.0
    if isinstance(target, Mapping) and len(target) == 1:
        ((kind, rate),) = target.items()
        if kind in ("fmr", "fnmr") and 0 < float(rate) < 1:
            return kind, float(rate)
    raise ValueError(f"target must be 'eer', {{'fmr': t}} or {{'fnmr': t}} with 0 < t < 1, got {target!r}")


def _weighted_points(
    x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, k: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as (points, weights) whose weighted soft rate is the mean soft rate of ``x``.

    Binning moves each pair by at most half a bin, ``1/(2·64·k)``: far below the soft step.
    """
    span = float(high - low)
    bins = math.ceil(span * k * _BINS_PER_UNIT_SHARPNESS) + 1
    if bins >= x.numel() or bins > _MAX_BINS:
        return x, torch.full_like(x, 1 / x.numel())
    width = span / (bins - 1)
    index = ((x - low) / width).round_().long()
    counts = torch.bincount(index, minlength=bins).to(x.dtype)
    centers = low + width * torch.arange(bins, dtype=x.dtype, device=x.device)
    return centers, counts / x.numel()


def _implicit_shift(equation: torch.Tensor, equation_slope: torch.Tensor) -> torch.Tensor:
    """Zero in value; gradient ``−(∂F/∂θ)/(∂F/∂d)``, the derivative of the root of ``F = 0``.

    Where no pair is near the threshold the slope vanishes, and so does ``∂F/∂θ``: the shift
    is then dropped instead of dividing by zero.
    """
    slope = equation_slope.detach()
    if slope.abs() < 1e-12:
        return torch.zeros((), dtype=equation.dtype, device=equation.device)
    return -(equation - equation.detach()) / slope
