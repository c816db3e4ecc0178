"""EERLoss itself: the options, and the loss of a batch at its threshold from the pairs' sums.

For a batch of embeddings, every unordered pair of samples is either *genuine* (same label,
distances ``L``) or *impostor* (different labels, distances ``I``). With sharpness ``k``:

    FRR_s(d) = mean_L tanh(k · max(0, ℓ − d))      soft false-reject rate at threshold d
    FAR_s(d) = mean_I tanh(k · max(0, d − i))      soft false-accept rate at threshold d

A search (``threshold``) finds the threshold ``d*`` of the requested DET operating point — the root of

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

Recipe options (measured in ``docs/archive/research-notes.md``): ``normalize=True`` (default)
L2-normalises the embeddings before the distance, so pair distances live in ``[0, 2]`` and ``k``
keeps a fixed meaning instead of drifting with the embedding norm; ``floor="softplus"`` (default,
``soft_terms``) keeps a gradient on correct pairs near ``d*``. Both lowered the held-out EER;
``normalize=False, floor="hard"`` is the authors' form. ``evaluate_at="midpoint"`` reproduces a
quirk of the authors' code, which evaluates the rates at the last midpoint of the search instead
of at ``d*``.

Several operating points of one kind (``target_rates``, which
:class:`~pipeline.losses.fmr_band.FMRBandLoss` sets to a band of FMRs): the loss is the mean of
the points' losses. They share the pass that finds the pairs, the histogram and the backward
pass's block matmuls; each adds its own threshold search and a pass of elementwise sums.

``return_stats``' exact EER is the official EER of the points the search uses: exact distances
where a side has fewer pairs than the search grid has bins, else that side's histogram, i.e. the
distances rounded to ``1/(64k)`` (only pairs within half a bin of the EER threshold can move it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.losses.eer.autograd import _AREA, _RATE, _PairSums, _ScaleGradient, _Summands
from pipeline.losses.eer.collective import _Collective
from pipeline.losses.eer.pairs import _GENUINE, _IMPOSTOR, Memory, _distance_vectors, _filled, _PairSet
from pipeline.losses.eer.soft_terms import _SoftTerms
from pipeline.losses.eer.threshold import Points, RunningThreshold, _implicit_shift, _search_points, _ThresholdSearch

Target = Literal["eer"] | Mapping[str, float]


@dataclass(frozen=True)
class EERStats:
    """Diagnostics of one loss call (fractions, not percent), for logging."""

    threshold: float  # where the loss was evaluated, in distance units: d*, or d̄ when persistent
    batch_threshold: float  # the batch's own d* (the midpoint with evaluate_at="midpoint")
    soft_far: float  # FAR_s at the threshold
    soft_frr: float  # FRR_s at the threshold
    exact_eer: float  # EER of the batch's pair distances by the official formula
    genuine_pairs: int
    impostor_pairs: int


class EERLoss(torch.nn.Module):
    """Smooth EER (or any DET operating point) of a batch, ``loss(embeddings, labels)``.

    Args:
        variant: ``"area"`` (authors' recommended form) or ``"direct"`` (the soft error rate).
        distance: ``"euclidean"`` or ``"cosine"`` (``1 − cos``).
        k: sharpness of the soft step, in 1/distance units.
        search_steps: steps of the threshold search.
        target: ``"eer"``, ``{"fmr": t}`` or ``{"fnmr": t}`` (rates as fractions).
        alpha, beta, eps: margin, power and floor of the area variant.
        threshold_grad: how the gradient reaches the threshold: ``"implicit"`` (exact at the
            root), ``"unrolled"`` (through the authors' search) or ``"detached"`` (not at all;
            see ``threshold``).
        evaluate_at: ``"threshold"`` (at d*) or ``"midpoint"`` (authors' last midpoint).
        normalize: L2-normalise the embeddings first (the default: it measured best,
            docs/archive/research-notes.md).
        floor, tau: the area variant's floor, ``"hard"`` ``max(ε, x)`` or ``"softplus"`` ``τ·softplus(x/τ)``.
        both_sides: with an FMR or FNMR target, keep both area terms instead of only the one the
            target does not fix (the authors' form; docs/results.md, "Tried, did not help", measures both).
        threshold_momentum: ``m`` of a persistent threshold ``d̄ ← m·d̄ + (1−m)·d*`` across
            training calls, where the loss is then evaluated, with the implicit gradient taken at
            ``d̄``; 0, the default, searches every batch afresh. Only calls that train (module in
            training mode, autograd on) move ``d̄``.
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
        threshold_momentum: float = 0.0,
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
        if not 0 <= threshold_momentum < 1:
            raise ValueError(f"threshold_momentum must lie in [0, 1), got {threshold_momentum}")
        if threshold_momentum and threshold_grad != "implicit":
            raise ValueError(
                f"threshold_momentum={threshold_momentum} needs threshold_grad='implicit' (the persistent "
                f"threshold carries the implicit gradient of the root), got {threshold_grad!r}"
            )
        if k <= 0 or search_steps < 1:
            raise ValueError(f"k must be > 0 and search_steps >= 1, got k={k}, search_steps={search_steps}")
        self.variant, self.distance = variant, distance
        self.k, self.search_steps = float(k), int(search_steps)
        self.target_kind, self.target_rate = _parse_target(target)
        self.target_rates: tuple[float, ...] = (self.target_rate,)  # a band of points: FMRBandLoss
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)
        self.threshold_grad, self.evaluate_at = threshold_grad, evaluate_at
        self.normalize, self.floor, self.tau = bool(normalize), floor, float(tau)
        self.both_sides = bool(both_sides)
        self.running_threshold = RunningThreshold(threshold_momentum) if threshold_momentum else None
        self.soft_terms = _SoftTerms(self.k, self.alpha, self.beta, self.eps, self.floor, self.tau)
        self.search = _ThresholdSearch(self.target_kind, self.search_steps, self.soft_terms)

    def extra_repr(self) -> str:
        rates = "/".join(f"{rate:g}" for rate in self.target_rates)
        target = "eer" if self.target_kind == "eer" else f"{self.target_kind}={rates}"
        return (
            f"variant={self.variant}, distance={self.distance}, k={self.k:g}, "
            f"search_steps={self.search_steps}, target={target}, threshold_grad={self.threshold_grad}, "
            f"alpha={self.alpha:g}, beta={self.beta:g}, normalize={self.normalize}, floor={self.floor}, "
            f"both_sides={self.both_sides}"
            + (f", threshold_momentum={self.running_threshold.momentum:g}" if self.running_threshold else "")
        )

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        return_stats: bool = False,
        *,
        rows: range | slice | None = None,
        group: dist.ProcessGroup | None = None,
        memory: Memory | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, EERStats]:
        """The loss of the batch; with ``rows``, this rank's share of it.

        Every option can be sharded. Without ``rows`` every rank computes the whole loss
        (replicated); in a sum of losses only the EERLoss term takes ``rows`` (the gradient scale
        of a sharded loss, ``autograd``, belongs to it alone).

        Args:
            embeddings, labels: the batch ``[N, D]``, ``[N]`` (with ``rows``: the gathered
                global batch, identical on every rank of ``group``:
                ``pipeline.distributed.gather_embeddings``, rows in rank order).
            return_stats: also return the batch's ``EERStats`` (global ones when sharded).
            rows: this rank's own rows of the batch (``range(start, start + n_local)``, ``start``
                the sum of the lower ranks' local sizes); it then scores only the pairs those
                rows own, and ``group`` sums the shares.
            group: the process group of the ranks sharing the batch (default: the world).
            memory: ``(embeddings [M, D], labels [M])`` of earlier batches (a cross-batch memory,
                identical on every rank): every pair (batch row, memory row) is scored too, as a
                constant on the memory side (``pipeline/training/memory.py``).
        """
        if rows is not None and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("rows= shards the pairs across a process group, but none is initialised")
        collective = _Collective(group, sharded=rows is not None)
        own = range(len(labels)) if rows is None else _row_range(rows, len(labels))
        return self._loss(embeddings, labels, return_stats, own, collective, memory)

    def _loss(
        self, embeddings: torch.Tensor, labels: torch.Tensor, return_stats: bool, rows: range, collective: _Collective,
        memory: Memory | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, EERStats]:
        vectors = self._vectors(embeddings, labels)
        if memory is not None:
            memory = self._vectors(memory[0].detach().to(vectors.dtype), memory[1]), memory[1]
        pairs = _PairSet(vectors.detach(), labels, rows, self.distance, collective, memory)
        points = None
        if self.threshold_grad == "unrolled":
            searches = [self.search.unrolled(vectors, pairs, rate) for rate in self.target_rates]
        else:
            points = _search_points(pairs, self.k)
            with torch.no_grad():
                searches = [self.search.bisection(points, pairs, rate) for rate in self.target_rates]
        threshold, midpoint = (torch.stack(found) for found in zip(*searches))
        batch_at = midpoint if self.evaluate_at == "midpoint" else threshold
        at = batch_at
        if self.running_threshold is not None:  # one point (FMRBandLoss refuses it)
            at = self.running_threshold.blend(batch_at[0], self._trains()).reshape(1)
        loss, at, frr, far = self._at_threshold(vectors, pairs, at)
        if collective.world > 1:
            loss = _ScaleGradient.apply(loss, float(collective.world))
        if not return_stats:
            return loss
        return loss, self._stats(points or _search_points(pairs, self.k), pairs, at[0], batch_at[0], frr[0], far[0])

    def _trains(self) -> bool:
        """Whether this call trains (and so moves a persistent threshold): evaluation does not."""
        return self.training and torch.is_grad_enabled()

    def _at_threshold(
        self, vectors: torch.Tensor, pairs: _PairSet, at: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, d*, FRR_s, FAR_s) at the thresholds ``at`` (one per point of ``target_rates``),
        from one pass of sums over the pairs; the loss is the mean over the points."""
        area = self._area_sides() if self.variant == "area" else (False, False)
        summands = _Summands(area=area, slopes=self.threshold_grad == "implicit")
        sums, slopes = _PairSums.apply(vectors, at, pairs, self.soft_terms, summands)
        sizes = pairs.sizes[:, None, None]
        means, mean_slopes = sums / sizes, slopes / sizes
        if self.threshold_grad == "implicit":
            # d* = d + (0 in value) carrying −(∂F/∂θ)/(∂F/∂d); the means follow to first order.
            rates, rate_slopes = means[..., _RATE], mean_slopes[..., _RATE]
            targets = _filled(self.target_rates, rates)
            shift = _implicit_shift(self.search.equation(rates[0], rates[1], targets),
                                    self.search.equation(rate_slopes[0], rate_slopes[1], 0.0))
            at = at + shift
            means = means[..., : _AREA + 1] + mean_slopes * shift[:, None]
        frr, far = means[_GENUINE, :, _RATE], means[_IMPOSTOR, :, _RATE]
        loss = self._direct(frr, far) if self.variant == "direct" else self._area(means[..., _AREA])
        return loss.mean(), at, frr, far

    def _vectors(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The rows whose Gram matrix gives the pair distances, as the options ask."""
        if embeddings.dtype not in (torch.float32, torch.float64):
            embeddings = embeddings.float()  # bf16/fp16 embeddings: the search needs fp32 resolution
        if self.normalize:
            embeddings = F.normalize(embeddings, dim=1)
        return _distance_vectors(embeddings, labels, self.distance)

    def _direct(self, frr: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
        if self.target_kind == "fmr":
            return 100 * frr
        if self.target_kind == "fnmr":
            return 100 * far
        return 100 * (frr + far) / 2

    def _area_sides(self) -> tuple[bool, bool]:
        """Whether the area variant keeps the (genuine, impostor) term: both for the EER, else the
        side the target does not fix (or both with ``both_sides``)."""
        return self.target_kind != "fnmr" or self.both_sides, self.target_kind != "fmr" or self.both_sides

    def _area(self, means: torch.Tensor) -> torch.Tensor:
        """100 · the power means ``(mean floor(u)^β)^(1/β)`` of the sides the target keeps."""
        kept = [means[side].pow(1 / self.beta) for side, keep in enumerate(self._area_sides()) if keep]
        return 100 * cast(torch.Tensor, sum(kept))  # at least one side is kept

    def _stats(
        self, points: Points, pairs: _PairSet, d: torch.Tensor, batch_d: torch.Tensor, frr: torch.Tensor,
        far: torch.Tensor,
    ) -> EERStats:
        return EERStats(
            threshold=float(d.detach()),
            batch_threshold=float(batch_d.detach()),
            soft_far=float(far.detach()),
            soft_frr=float(frr.detach()),
            exact_eer=_points_eer(points),
            genuine_pairs=pairs.counts[_GENUINE],
            impostor_pairs=pairs.counts[_IMPOSTOR],
        )


def _parse_target(target: Target) -> tuple[str, float]:
    if target == "eer":
        return "eer", 0.0
    if isinstance(target, Mapping) and len(target) == 1:
        ((kind, rate),) = target.items()
        if kind in ("fmr", "fnmr") and 0 < float(rate) < 1:
            return kind, float(rate)
    raise ValueError(f"target must be 'eer', {{'fmr': t}} or {{'fnmr': t}} with 0 < t < 1, got {target!r}")


def _row_range(rows: range | slice, n: int) -> range:
    """``rows`` as a contiguous ``range`` inside ``[0, n)``."""
    own = range(n)[rows] if isinstance(rows, slice) else rows
    if not isinstance(own, range) or own.step != 1 or (len(own) and (own.start < 0 or own.stop > n)):
        raise ValueError(f"rows must be a contiguous range of rows in [0, {n}), got {rows!r}")
    return own


def _points_eer(points: Points) -> float:
    """The official EER of the points weighted by their counts (exact when the points are)."""
    from sklearn.metrics import roc_curve

    from pipeline.metrics.verification import Roc

    scores = -torch.cat([p for p, _ in points]).detach().double().cpu().numpy()
    counts = torch.cat([c for _, c in points]).double().cpu().numpy()
    truth = np.r_[np.ones(points[_GENUINE][0].numel()), np.zeros(points[_IMPOSTOR][0].numel())]
    kept = counts > 0
    return Roc(*roc_curve(truth[kept], scores[kept], sample_weight=counts[kept])).eer()[0]
