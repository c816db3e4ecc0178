"""DET curves: FNMR against FMR on normal-deviate axes, the standard biometric plot.

On probit axes two Gaussian score distributions give a straight line, so systems are easy to
compare at the low error rates that matter. Drawn on a bare `Figure` (Agg canvas): no pyplot
state, safe in worker processes without a display.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.special import ndtri

from pipeline.metrics.verification import Roc

_TICKS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95)
_LIMITS = (ndtri(0.0005), ndtri(0.97))


def plot_det(curves: Mapping[str, Roc], path: str | Path) -> Path:
    """Plot one DET curve per `name -> ROC` with its EER point marked; save a PNG at `path`.

    The ROC the report was read from, not the comparisons: sorting every impostor pair of a large
    split again (twice, for sklearn's DET and the EER) would take more memory than the report did.
    """
    if not curves:
        raise ValueError("plot_det needs at least one curve")
    fig = Figure(figsize=(6.4, 6.0), layout="constrained")
    ax = fig.subplots()
    ax.plot(_LIMITS, _LIMITS, color="0.6", linestyle="--", linewidth=0.8, label="FMR = FNMR")
    for name, curve in curves.items():
        eer, _ = curve.eer()
        with np.errstate(divide="ignore"):  # rates of 0 map to -inf and fall off the plot
            (line,) = ax.plot(ndtri(curve.fmr), ndtri(curve.fnmr), linewidth=1.5,
                              label=f"{name} (EER {100 * eer:.2f} %)")
        ax.plot(ndtri(eer), ndtri(eer), "o", color=line.get_color(), markersize=6)
    ticks = ndtri(np.array(_TICKS))
    labels_pct = [f"{100 * t:g}" for t in _TICKS]
    ax.set_xticks(ticks, labels_pct)
    ax.set_yticks(ticks, labels_pct)
    ax.set_xlim(*_LIMITS)
    ax.set_ylim(*_LIMITS)
    ax.set_xlabel("False Match Rate (%)")
    ax.set_ylabel("False Non-Match Rate (%)")
    ax.set_title("Detection Error Tradeoff (DET)")
    ax.grid(True, linewidth=0.5, alpha=0.6)
    ax.legend(loc="upper right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=150)
    return path
