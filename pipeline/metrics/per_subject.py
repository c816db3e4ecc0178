"""Per-subject EER, AUC, accuracy and rank-1 of every subject, a group of subjects at a time.

The KVC report averages these over subjects. Calling `roc_curve` once per subject costs
~1-2 ms of fixed overhead each: tens of seconds to minutes for the 15,000-185,000 subjects of
KVC. This module runs sklearn's ROC construction for a group of subjects in one sorted sweep instead, step
for step (one point per distinct score at the end of its tie block, collinear points dropped by the
same second-difference test, a first point at +inf), so the FMR/FNMR values and hence EER,
threshold and accuracy are bit-identical to a per-subject `roc_curve` loop; AUC differs only
by float summation order. tests/test_metrics.py checks this against that loop.

A subject's comparisons are those whose reference belongs to it. A subject with no genuine or no
impostor comparison has no ROC curve: it is skipped and listed in `PerSubject.skipped`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray


@dataclass(frozen=True)
class PerSubject:
    """One value per evaluated subject (aligned with `subjects`), plus the subjects left out."""

    subjects: NDArray
    eer: NDArray[np.float64]
    eer_threshold: NDArray[np.float64]
    auc: NDArray[np.float64]
    accuracy: NDArray[np.float64]
    rank1: NDArray[np.float64]
    skipped: NDArray


# Comparisons swept at once (~0.5 GB): the sweep holds ~120 bytes per comparison, so a split scored
# on every impostor pair (162 M comparisons for 1,200 subjects of 15 sessions: 19 GB at once) is swept
# a group of subjects at a time. Each subject's numbers depend on its own comparisons only, in their
# own order: the groups change no bit of the result.
SWEEP_COMPARISONS = 1 << 22


def per_subject_metrics(
    labels: NDArray[np.int8], scores: NDArray[np.float64], subjects: ArrayLike
) -> PerSubject:
    """Metrics of each subject's own comparisons; inputs as returned by `validate`."""
    subjects = np.asarray(subjects)
    if subjects.shape != labels.shape:
        raise ValueError(
            f"subjects must give one id per comparison: {subjects.shape} ids, {labels.shape} scores"
        )
    ids, codes = np.unique(subjects, return_inverse=True)
    n_genuine = np.bincount(codes, weights=labels, minlength=len(ids)).astype(np.int64)
    n_all = np.bincount(codes, minlength=len(ids))
    ok = (n_genuine > 0) & (n_genuine < n_all)
    if not ok.any():
        raise ValueError(
            "no subject has both a genuine and an impostor comparison: per-subject metrics are undefined"
        )
    order = np.argsort(codes, kind="stable")  # each subject's comparisons together, in input order
    ends = np.cumsum(n_all)
    groups = [_subject_metrics(labels[rows], scores[rows], codes[rows] - first, n_genuine[first:stop],
                               n_all[first:stop] - n_genuine[first:stop])
              for first, stop in _subject_groups(n_all, ok)
              for rows in [order[ends[first] - n_all[first]: ends[stop - 1]]]]
    eer, eer_threshold, auc, accuracy, rank1 = (np.concatenate(values) for values in zip(*groups))
    return PerSubject(ids[ok], eer, eer_threshold, auc, accuracy, rank1, skipped=ids[~ok])


def _subject_groups(n_all: NDArray[np.int64], ok: NDArray[np.bool_]) -> list[tuple[int, int]]:
    """``(first, stop)`` ranges of subject codes, each starting and ending at a subject with a curve
    and sweeping at most :data:`SWEEP_COMPARISONS` comparisons (or one subject, however many; the
    subjects without a curve inside a range are sliced with it, then dropped)."""
    groups: list[tuple[int, int]] = []
    size = 0
    for code in map(int, np.flatnonzero(ok)):
        count = int(n_all[code])
        if groups and size + count <= SWEEP_COMPARISONS:
            groups[-1], size = (groups[-1][0], code + 1), size + count
        else:
            groups.append((code, code + 1))
            size = count
    return groups


def _subject_metrics(
    labels: NDArray[np.int8], scores: NDArray[np.float64], codes: NDArray[np.int64],
    n_genuine: NDArray[np.int64], n_impostor: NDArray[np.int64],
) -> tuple[NDArray[np.float64], ...]:
    """(EER, its threshold, AUC, accuracy, rank-1) of each subject with a curve among ``codes``
    (0 … len(n_genuine) − 1; subjects without one are dropped here)."""
    ok = (n_genuine > 0) & (n_impostor > 0)
    keep = ok[codes]
    labels, scores = labels[keep], scores[keep]
    codes = (np.cumsum(ok) - 1)[codes[keep]]  # renumber the kept subjects 0..S-1
    n_pos, n_neg = n_genuine[ok], n_impostor[ok]

    sweep = _Sweep.of(labels, scores, codes)
    fmr, tmr, thresholds, curve_subject = sweep.roc(n_pos, n_neg)
    eer, eer_threshold = _grouped_eer(fmr, tmr, thresholds, curve_subject)
    within = curve_subject[1:] == curve_subject[:-1]  # trapezoids that do not straddle two subjects
    trapezoids = np.diff(fmr) * (tmr[1:] + tmr[:-1]) / 2.0
    auc = np.bincount(curve_subject[1:][within], weights=trapezoids[within], minlength=len(n_pos))
    correct = (scores > eer_threshold[codes]) == labels
    accuracy = np.bincount(codes, weights=correct) / (n_pos + n_neg)
    genuine = sweep.label == 1
    ranked_first = sweep.impostors_at_or_above()[genuine] == 0
    rank1 = np.bincount(sweep.subject[genuine], weights=ranked_first, minlength=len(n_pos)) / n_pos
    # numpy's stubs type bincount as integer even with float weights
    return eer, eer_threshold, auc, accuracy, rank1  # type: ignore[return-value]


@dataclass(frozen=True)
class _Sweep:
    """A group's comparisons sorted by subject, then by score descending, with running counts per subject."""

    subject: NDArray[np.int64]
    score: NDArray[np.float64]
    label: NDArray[np.int64]
    tps: NDArray[np.int64]  # genuine comparisons of the subject at or before this position
    fps: NDArray[np.int64]  # impostor comparisons of the subject at or before this position
    block_end: NDArray[np.bool_]  # last comparison of a run of equal scores within a subject

    @classmethod
    def of(cls, labels: NDArray[np.int8], scores: NDArray[np.float64], codes: NDArray[np.int64]) -> _Sweep:
        # The order inside a run of equal scores is irrelevant (only run ends are read): a fast
        # unstable sort by score, then a stable (radix) sort by subject.
        by_score = np.argsort(-scores)
        order = by_score[np.argsort(codes[by_score], kind="stable")]
        subject, score, label = codes[order], scores[order], labels[order].astype(np.int64)
        subject_end = np.r_[subject[1:] != subject[:-1], True]
        starts = np.flatnonzero(np.r_[True, subject_end[:-1]])
        tp_seen = np.cumsum(label)
        tps = tp_seen - (tp_seen[starts] - label[starts])[subject]
        fps = np.arange(len(score)) - starts[subject] + 1 - tps
        block_end = subject_end | np.r_[score[1:] != score[:-1], True]
        return cls(subject, score, label, tps, fps, block_end)

    def impostors_at_or_above(self) -> NDArray[np.int64]:
        """Per position: impostors of the subject scoring >= this score, i.e. FP count at the end of its run.

        rank = 1 + this count (ties ranked behind the impostors, as in verification.py).
        """
        ends = np.flatnonzero(self.block_end)
        return self.fps[ends][np.cumsum(self.block_end) - self.block_end]

    def roc(
        self, n_pos: NDArray[np.int64], n_neg: NDArray[np.int64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
        """sklearn's `roc_curve` of every subject, concatenated: (fmr, tmr, thresholds, subject of each point)."""
        # One point per distinct score of a subject, at the end of its run of equal scores.
        ends = np.flatnonzero(self.block_end)
        subject, tps, fps, score = self.subject[ends], self.tps[ends], self.fps[ends], self.score[ends]
        # Keep a subject's first and last point and every corner (non-zero second difference).
        first = np.r_[True, subject[1:] != subject[:-1]]
        last = np.r_[first[1:], True]
        corner = np.zeros_like(first)
        corner[1:-1] = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
        kept = first | last | corner
        subject, tps, fps, score = subject[kept], tps[kept], fps[kept], score[kept]
        # Each curve starts at (0, 0) with threshold +inf.
        at = np.flatnonzero(first[kept])
        subject = np.insert(subject, at, subject[at])
        tps, fps = np.insert(tps, at, 0), np.insert(fps, at, 0)
        thresholds = np.insert(score, at, np.inf)
        return fps / n_neg[subject], tps / n_pos[subject], thresholds, subject


def _grouped_eer(
    fmr: NDArray[np.float64],
    tmr: NDArray[np.float64],
    thresholds: NDArray[np.float64],
    subject: NDArray[np.int64],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per subject: the first curve point minimising |FNMR - FMR| (as `nanargmin`), its EER and threshold."""
    fnmr = 1.0 - tmr
    gap = np.abs(fnmr - fmr)
    starts = np.flatnonzero(np.r_[True, subject[1:] != subject[:-1]])
    hits = np.flatnonzero(gap == np.minimum.reduceat(gap, starts)[subject])
    best = hits[np.r_[True, subject[hits][1:] != subject[hits][:-1]]]
    return (fmr[best] + fnmr[best]) / 2, thresholds[best]
