"""Benchmark of pipeline.metrics against the official-style computations, measured in the same run.

    python -m bench.metrics

References: a `roc_curve` call per subject for the per-subject block, and the official rank-N
procedure (one sort of all impostor scores per genuine score) for rank-1.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from sklearn.metrics import auc, roc_curve

from pipeline.metrics import per_subject as per_subject_module
from pipeline.metrics import per_subject_metrics, rank_n, validate, verification_report
from pipeline.metrics.verification import Roc

SUBJECTS, PER_SUBJECT, GENUINE_SHARE = 1_000, 1_000, 0.1


def _seconds(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of `repeat` runs: the least disturbed by other processes."""
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _peak_gb(fn: Callable[[], object]) -> float:
    """Peak memory NumPy allocated while ``fn`` ran, GB (tracemalloc sees NumPy's buffers)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 1e9
    finally:
        tracemalloc.stop()


def _grouped_sweep_rows(rng: np.random.Generator) -> list[str]:
    """The per-subject block of 16 M comparisons (every pair of a large split) a group of subjects at
    a time, as shipped, against one sweep of them all: peak memory and time."""
    y, s, ids = _synthetic(4_000, 4_000, rng)
    y, s = validate(y, s)
    grouped = _peak_gb(lambda: per_subject_metrics(y, s, ids)), _seconds(lambda: per_subject_metrics(y, s, ids), 1)
    shipped, per_subject_module.SWEEP_COMPARISONS = per_subject_module.SWEEP_COMPARISONS, len(y)
    try:
        whole = _peak_gb(lambda: per_subject_metrics(y, s, ids)), _seconds(lambda: per_subject_metrics(y, s, ids), 1)
    finally:
        per_subject_module.SWEEP_COMPARISONS = shipped
    return [f"per-subject block, 16 M comparisons in groups of {shipped:,}: "
            f"peak {grouped[0]:.2f} GB, {grouped[1]:.2f} s",
            f"  reference: one sweep: peak {whole[0]:.2f} GB ({whole[0] / grouped[0]:.1f}x), {whole[1]:.2f} s "
            f"({whole[1] / grouped[1]:.2f}x)"]


def _every_pair_rows() -> list[str]:
    """Scoring every pair of 9,000 sessions (600 subjects of 15; 40.5 M comparisons) as the session
    protocol does, blocks of rows by one matrix product, against index pairs and row gathers."""
    import torch

    from pipeline.evaluation.protocol import every_pair, pair_scores

    labels = np.repeat(np.arange(600), 15)
    embeddings = torch.randn(len(labels), 64, generator=torch.Generator().manual_seed(0))

    def gathered() -> None:
        first, second = np.triu_indices(len(labels), 1)
        pair_scores(embeddings, first, second, "cosine"), labels[first] == labels[second], labels[first]

    ours, reference = (_seconds(lambda: every_pair(embeddings, labels, "cosine"), 1), _seconds(gathered, 1))
    return [f"every pair of 9,000 sessions (40.5 M), blocks of rows: {ours:.2f} s",
            f"  reference: index pairs and row gathers: {reference:.2f} s ({reference / ours:.0f}x)"]


def _synthetic(n_subjects: int, per: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`per` comparisons per subject, GENUINE_SHARE of them genuine; Gaussian scores, EER ~ 10 %."""
    labels = np.tile(np.arange(per) < GENUINE_SHARE * per, n_subjects).astype(np.int8)
    return labels, rng.normal(size=len(labels)) + 2.5 * labels, np.repeat(np.arange(n_subjects), per)


def _official_rank_loop(labels: np.ndarray, scores: np.ndarray, n: int = 1) -> float:
    """The official procedure: per genuine score, insert it before all impostors, sort, look at the top n."""
    impostors = scores[labels == 0]
    hits = []
    for genuine in scores[labels == 1]:
        ranked = np.stack((np.insert(impostors, 0, genuine), np.insert(np.zeros(len(impostors)), 0, 1))).T
        ranked = ranked[np.argsort(ranked[:, 0])[::-1]]
        hits.append(ranked[:n, 1].sum())
    return float(np.mean(hits))


def _per_subject_loop(labels: np.ndarray, scores: np.ndarray, subjects: np.ndarray) -> None:
    """EER, AUC and accuracy with one `roc_curve` per subject (rank-1 left out: it would dominate)."""
    for subject in np.unique(subjects):
        mine = subjects == subject
        y, s = labels[mine], scores[mine]
        fmr, tmr, thresholds = roc_curve(y, s)
        i = np.nanargmin(np.abs(1 - tmr - fmr))
        auc(fmr, tmr)
        np.mean((s > thresholds[i]) == y)


def main() -> None:
    rng = np.random.default_rng(0)
    labels, scores, subjects = _synthetic(SUBJECTS, PER_SUBJECT, rng)
    n = len(labels)
    n_genuine = int(labels.sum())
    print(f"pipeline.metrics — {n:,} comparisons ({n_genuine:,} genuine), {SUBJECTS:,} subjects; best of 3")

    rows: list[tuple[str, float, float | None]] = [
        ("report, global block", _seconds(lambda: verification_report(labels, scores)), None),
        ("report, global + per-subject", _seconds(lambda: verification_report(labels, scores, subjects)), None),
    ]
    # A validation: the report, then the checkpoint-selection metric read off the report's own curve
    # (what `verify` hands the validator) against a second ROC built for it.
    def validation(shared: bool) -> float:
        if shared:
            curve = Roc.of(*validate(labels, scores))
            verification_report(labels, scores, subjects, curve=curve)
        else:
            verification_report(labels, scores, subjects)
            curve = Roc.of(*validate(labels, scores))
        return curve.fnmr_at(1e-3)

    shared_curve, second_curve = _seconds(lambda: validation(True)), _seconds(lambda: validation(False))
    rows += [
        ("validation: report + selection on its curve", shared_curve, None),
        ("  reference: report + a second ROC", second_curve, second_curve / shared_curve),
    ]
    # Per-subject block alone, on the 1M set and on a KVC-like shape (many subjects, few comparisons).
    for n_subjects, per in ((SUBJECTS, PER_SUBJECT), (2_000, 50)):
        y, s, ids = _synthetic(n_subjects, per, rng)
        ours = _seconds(lambda y=y, s=s, ids=ids: per_subject_metrics(*validate(y, s), ids))
        loop = _seconds(lambda y=y, s=s, ids=ids: _per_subject_loop(y, s, ids), repeat=1)
        rows += [
            (f"per-subject block, {n_subjects:,} x {per:,}: vectorised", ours, None),
            ("  reference: roc_curve per subject, no rank-1", loop, loop / ours),
        ]

    g_small, i_small = 2_000, 20_000
    small_labels = np.r_[np.ones(g_small, np.int8), np.zeros(i_small, np.int8)]
    small_scores = rng.normal(size=g_small + i_small) + 2.5 * small_labels
    ours_small = _seconds(lambda: rank_n(small_labels, small_scores))
    loop_small = _seconds(lambda: _official_rank_loop(small_labels, small_scores), repeat=1)
    assert rank_n(small_labels, small_scores) == _official_rank_loop(small_labels, small_scores)  # no ties here
    rows += [
        (f"rank-1, {g_small:,} x {i_small:,}: vectorised", ours_small, None),
        ("  reference: official loop", loop_small, loop_small / ours_small),
    ]

    # The loop at 1M is hours: time a few genuine scores against all 1M-size impostors, times G.
    probe = 5
    probe_labels = np.r_[np.ones(probe, np.int8), labels[labels == 0]]
    probe_scores = np.r_[scores[labels == 1][:probe], scores[labels == 0]]
    loop_full = _seconds(lambda: _official_rank_loop(probe_labels, probe_scores), repeat=1) / probe * n_genuine
    ours_full = _seconds(lambda: rank_n(labels, scores))
    rows += [
        (f"rank-1, {n_genuine:,} x {n - n_genuine:,}: vectorised", ours_full, None),
        (f"  reference: official loop, EXTRAPOLATED from {probe} genuine", loop_full, loop_full / ours_full),
    ]

    width = max(len(name) for name, _, _ in rows)
    print(f"{'':{width}}  {'seconds':>10}  {'ratio':>10}")
    for name, seconds, ratio in rows:
        shown = "" if ratio is None else f"{ratio:9.0f}x" if ratio >= 10 else f"{ratio:9.2f}x"
        print(f"{name:{width}}  {seconds:10.3f}  {shown:>10}")
    print("\n".join([*_grouped_sweep_rows(rng), *_every_pair_rows()]))


if __name__ == "__main__":
    main()
