"""Official KVC verification metrics (docs/design.md §4): EER, FNMR@FMR, AUC, accuracy, rank-N, DET plots.

    from pipeline.metrics import verification_report, report_to_markdown
    print(report_to_markdown(verification_report(labels, scores, subjects)))
"""

from pipeline.metrics.det import plot_det
from pipeline.metrics.per_subject import PerSubject, per_subject_metrics
from pipeline.metrics.report import fnmr_key, report_to_markdown, verification_report
from pipeline.metrics.verification import FMR_TARGETS, Roc, accuracy, eer, fnmr_at_fmr, rank_n, roc_auc, validate

__all__ = [
    "FMR_TARGETS",
    "PerSubject",
    "Roc",
    "accuracy",
    "eer",
    "fnmr_at_fmr",
    "fnmr_key",
    "per_subject_metrics",
    "plot_det",
    "rank_n",
    "report_to_markdown",
    "roc_auc",
    "validate",
    "verification_report",
]
