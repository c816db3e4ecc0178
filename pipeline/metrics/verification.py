"""The official KVC verification metrics (docs/design.md §4), computed exactly and fast.

Source of the definitions: `utils/metrics.py` of gstrag/Keystroke-Verification-Challenge
(read at commit 1a73518). Labels are 1 = genuine and 0 = impostor comparison, a higher
score means "more similar", and every curve is `sklearn.metrics.roc_curve(labels, scores)`
with its defaults, so FMR = fpr and FNMR = 1 - tpr.

Rank-N, facts from that file: for every genuine score it inserts the score at position 0 in
front of *all* impostor scores, orders the pair list with `np.argsort(...)[::-1]` (NumPy's
default, unstable sort) and counts 1 when the genuine score is among the first N. The order
of tied scores under an unstable sort is implementation-defined: measured here (NumPy 2.4.6,
AVX2), a genuine score tied with the best impostor came out first in 0-21 % of random trials
depending on the array length, so the tie outcome of the official code cannot be reproduced.
With a stable sort the same procedure puts the genuine score *after* every tied impostor, i.e.
rank = 1 + #{impostor scores >= genuine score}. That deterministic reading is the one used here
(it also gives rank-1 = 0, not 1, to a system that scores everything equally).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import auc, roc_curve

FMR_TARGETS: tuple[float, ...] = (0.001, 0.01, 0.1)
"""The operating points of the official report: FNMR at FMR = 0.1 %, 1 % and 10 %."""


def validate(labels: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.int8], NDArray[np.float64]]:
    """Check a score list once, so that no metric silently returns NaN or a meaningless value."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D; got shapes {labels.shape} and {scores.shape}")
    if len(labels) != len(scores):
        raise ValueError(f"labels and scores differ in length: {len(labels)} labels, {len(scores)} scores")
    not_binary = ~np.isin(labels, (0, 1))
    if not_binary.any():
        found = np.unique(labels[not_binary])[:5].tolist()
        raise ValueError(f"labels must be 1 (genuine) or 0 (impostor); found {found}")
    n_bad = int(np.count_nonzero(~np.isfinite(scores)))
    if n_bad:
        raise ValueError(f"scores must be finite; {n_bad} of {len(scores)} are NaN or infinite")
    labels = labels.astype(np.int8, copy=False)
    n_genuine = int(np.count_nonzero(labels))
    if n_genuine == 0 or n_genuine == len(labels):
        raise ValueError(
            "need at least one genuine (label 1) and one impostor (label 0) comparison; "
            f"got {n_genuine} genuine and {len(labels) - n_genuine} impostor"
        )
    return labels, scores


@dataclass(frozen=True)
class Roc:
    """The official curve, computed once and shared by every metric read from it."""

    fmr: NDArray[np.float64]
    tmr: NDArray[np.float64]
    thresholds: NDArray[np.float64]

    @classmethod
    def of(cls, labels: NDArray[np.int8], scores: NDArray[np.float64]) -> Roc:
        """sklearn's ROC with its defaults: collinear points dropped, a first point at +inf."""
        fmr, tmr, thresholds = roc_curve(labels, scores)
        return cls(fmr, tmr, thresholds)

    @property
    def fnmr(self) -> NDArray[np.float64]:
        return 1.0 - self.tmr

    def eer(self) -> tuple[float, float]:
        """(EER, threshold) at the curve point where |FNMR - FMR| is smallest (the first one on ties)."""
        fnmr = self.fnmr
        i = np.nanargmin(np.abs(fnmr - self.fmr))
        return float((self.fmr[i] + fnmr[i]) / 2), float(self.thresholds[i])

    def fnmr_at(self, target: float) -> float:
        """FNMR at the curve point whose FMR is nearest to `target` (the first one on ties)."""
        return float(self.fnmr[np.nanargmin(np.abs(target - self.fmr))])

    def fmr_at(self, target: float) -> float:
        """FMR at the curve point whose FNMR is nearest to `target` (the first one on ties)."""
        return float(self.fmr[np.nanargmin(np.abs(target - self.fnmr))])

    def auc(self) -> float:
        return float(auc(self.fmr, self.tmr))


def eer(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Equal Error Rate and its threshold (the KVC leaderboard metric)."""
    return Roc.of(*validate(labels, scores)).eer()


def fnmr_at_fmr(labels: ArrayLike, scores: ArrayLike, target: float) -> float:
    """False Non-Match Rate at the operating point where the FMR is nearest to `target`."""
    return Roc.of(*validate(labels, scores)).fnmr_at(target)


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the official ROC curve."""
    return Roc.of(*validate(labels, scores)).auc()


def accuracy(labels: ArrayLike, scores: ArrayLike, threshold: float) -> float:
    """Share of comparisons decided right when "genuine" means score > threshold."""
    labels, scores = validate(labels, scores)
    return share_correct(labels, scores, threshold)


def rank_n(labels: ArrayLike, scores: ArrayLike, n: int = 1) -> float:
    """Share of genuine scores ranked within the top `n` among all impostor scores (ties: see module doc)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"rank N must be a positive integer; got {n!r}")
    labels, scores = validate(labels, scores)
    return float(np.mean(impostors_at_or_above(labels, scores) < n))


def share_correct(labels: NDArray[np.int8], scores: NDArray[np.float64], threshold: float) -> float:
    """`accuracy` on inputs already validated."""
    return float(np.mean((scores > threshold) == labels))


def impostors_at_or_above(labels: NDArray[np.int8], scores: NDArray[np.float64]) -> NDArray[np.int64]:
    """For each genuine comparison (input order): how many impostor scores are >= it; rank = 1 + this.

    One sort of the impostors and a binary search per genuine score, O((G + I) log I), instead of
    the official O(G · I log I) sort per genuine score.
    """
    genuine = labels == 1
    impostors = np.sort(scores[~genuine])
    return len(impostors) - np.searchsorted(impostors, scores[genuine], side="left")
