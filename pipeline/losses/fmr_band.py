"""FMRBandLoss: EERLoss's FNMR averaged over FMR targets spread across a band ``[low, high]``.

Why: training for one low operating point (``target={"fmr": 0.001}``) did not win at that
point on real keystrokes (docs/results.md, "Tried, did not help"). At FMR 0.1 % the batch's
threshold is set by the few dozen impostor pairs above it, so the threshold, and the genuine
pairs its gradient acts on, change from batch to batch. Averaging the FNMR at several FMRs from ``low`` up to a
few times ``low`` — a Riemann sum of the partial area under the DET curve on ``[low, high]``,
the partial-AUC objective of the literature restricted to the low-FMR band a deployment cares
about — sets most of the thresholds with many more impostor pairs while still weighting the
low-FMR end. ``low`` is the operating point the run is for; checkpoints are selected by the
band's own average FNMR on validation (``pipeline/training/validator.py``), the quantity it
trains, which rests on more impostor comparisons than the FNMR at ``low`` alone.

The band is an :class:`~pipeline.losses.eer.EERLoss` with several FMR targets: the points share
one pass that finds the pairs, one histogram, and one backward pair of block matmuls, and cost a
threshold search on the histogram and a pass of elementwise terms each, so the band inherits pair
sharding, the cross-batch memory and the implicit threshold gradient at little more than one
point's cost (``bench/README.md``). Its statistics are those of the ``low`` point. A persistent
threshold (``threshold_momentum``) is refused: the checkpoint keeps one running threshold, and a
band has one per point.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.losses.eer import EERLoss


def band_rates(low: float, high: float, points: int) -> tuple[float, ...]:
    """The band's ``points`` FMRs, evenly spaced on ``[low, high]``: what it trains and selects by."""
    return tuple(torch.linspace(low, high, points, dtype=torch.float64).tolist())


class FMRBandLoss(EERLoss):
    """``mean_t EERLoss(target={"fmr": t})`` over ``points`` FMRs evenly spaced on ``[low, high]``."""

    DEFAULT_LOW, DEFAULT_HIGH, DEFAULT_POINTS = 0.001, 0.004, 4

    def __init__(
        self, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH, points: int = DEFAULT_POINTS, **eer_options: Any
    ) -> None:
        if not 0 < low < high < 1 or isinstance(points, bool) or not isinstance(points, int) or points < 2:
            raise ValueError(
                f"fmr_band needs 0 < low < high < 1 and an integer points >= 2, got low={low!r}, high={high!r}, "
                f"points={points!r}"
            )
        refused = sorted({"target", "threshold_momentum"} & set(eer_options))
        if refused:
            raise ValueError(
                f"fmr_band: {', '.join(refused)} cannot be set (the band sets every point's target; one "
                "running threshold cannot follow every point); leave it out of the loss options"
            )
        super().__init__(target={"fmr": low}, **eer_options)
        self.low, self.high = float(low), float(high)
        self.target_rates = band_rates(self.low, self.high, points)
