"""The KVC verification report: a global block and a mean-per-subject block, as a dict or Markdown."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from pipeline.metrics.per_subject import per_subject_metrics
from pipeline.metrics.verification import FMR_TARGETS, Roc, impostors_at_or_above, share_correct, validate

Report = dict[str, dict[str, float | int]]


def fnmr_key(target: float) -> str:
    """Report key of an operating point, e.g. 0.001 -> 'fnmr_at_fmr_0.1%'."""
    return f"fnmr_at_fmr_{100 * target:g}%"


def verification_report(
    labels: ArrayLike, scores: ArrayLike, subjects: ArrayLike | None = None, curve: Roc | None = None
) -> Report:
    """All official metrics, as fractions in [0, 1] (plain floats, JSON-ready).

    `global`: all comparisons pooled (EER and its threshold, FNMR at FMR 0.1/1/10 %, AUC,
    accuracy at the EER threshold, rank-1 of each genuine score among all impostor scores).
    `mean_per_subject` (when `subjects`, the subject id of each comparison's reference, is
    given): EER, AUC, accuracy at the subject's own EER threshold and rank-1 among the subject's
    own impostor scores, computed per subject and averaged with equal weight per subject.
    Subjects without a genuine or without an impostor comparison have no EER; they are left
    out of the mean and counted in `subjects_skipped`. `curve`: these comparisons' ROC, when the
    caller already holds it.
    """
    labels, scores = validate(labels, scores)
    curve = Roc.of(labels, scores) if curve is None else curve
    eer, threshold = curve.eer()
    n_genuine = int(np.count_nonzero(labels))
    report: Report = {
        "global": {
            "eer": eer,
            "eer_threshold": threshold,
            **{fnmr_key(t): curve.fnmr_at(t) for t in FMR_TARGETS},
            "auc": curve.auc(),
            "accuracy": share_correct(labels, scores, threshold),
            "rank1": float(np.mean(impostors_at_or_above(labels, scores) < 1)),
            "genuine": n_genuine,
            "impostor": len(labels) - n_genuine,
        }
    }
    if subjects is not None:
        per = per_subject_metrics(labels, scores, subjects)
        report["mean_per_subject"] = {
            "eer": float(per.eer.mean()),
            "auc": float(per.auc.mean()),
            "accuracy": float(per.accuracy.mean()),
            "rank1": float(per.rank1.mean()),
            "subjects": len(per.subjects),
            "subjects_skipped": len(per.skipped),
        }
    return report


_COLUMNS = (
    ("EER", "eer"),
    *((f"FNMR@{100 * t:g}%FMR", fnmr_key(t)) for t in FMR_TARGETS),
    ("AUC", "auc"),
    ("Accuracy", "accuracy"),
    ("Rank-1", "rank1"),
)
_ROWS = (("Global", "global"), ("Mean per subject", "mean_per_subject"))


def report_to_markdown(report: Report) -> str:
    """The report as one Markdown table in percent (like the KVC results page), plus its counts."""
    lines = [
        "| | " + " | ".join(f"{title} [%]" for title, _ in _COLUMNS) + " |",
        "|:--|" + "--:|" * len(_COLUMNS),
    ]
    for row_title, block_key in _ROWS:
        if block_key in report:
            block = report[block_key]
            cells = (f"{100 * block[key]:.2f}" if key in block else "–" for _, key in _COLUMNS)
            lines.append(f"| {row_title} | " + " | ".join(cells) + " |")
    total = report["global"]
    lines += [
        "",
        f"Global: {total['genuine']:,} genuine and {total['impostor']:,} impostor comparisons; "
        f"EER threshold {total['eer_threshold']:.6g}.",
    ]
    if "mean_per_subject" in report:
        block = report["mean_per_subject"]
        lines.append(
            f"Mean per subject over {block['subjects']:,} subjects "
            f"({block['subjects_skipped']:,} skipped: no genuine or no impostor comparison)."
        )
    return "\n".join(lines) + "\n"
