"""Specification of pipeline.metrics: every metric equals the official KVC formula written out plainly.

The reference functions below restate docs/design.md §4 (official `utils/metrics.py`) as directly as
possible: one `roc_curve` per metric, one sort per genuine score for rank-N, one Python loop over
subjects for the per-subject block. Integer-valued scores make ties frequent on purpose.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import auc, roc_curve

from pipeline.metrics import (
    FMR_TARGETS,
    accuracy,
    eer,
    fnmr_at_fmr,
    fnmr_key,
    plot_det,
    rank_n,
    report_to_markdown,
    roc_auc,
    verification_report,
)
from pipeline.metrics import per_subject as per_subject_module
from pipeline.metrics.per_subject import per_subject_metrics
from pipeline.metrics.verification import Roc, validate

TOL = 1e-12


# ---- the official formulas, written plainly ------------------------------------------------


def official_eer(labels, scores):
    fmr, tmr, thresholds = roc_curve(labels, scores)
    fnmr = 1 - tmr
    i = np.nanargmin(np.abs(fnmr - fmr))
    return np.mean((fmr[i], fnmr[i])), thresholds[i]


def official_fnmr_at_fmr(labels, scores, target):
    fmr, tmr, _ = roc_curve(labels, scores)
    return (1 - tmr)[np.nanargmin(np.abs(target - fmr))]


def official_auc(labels, scores):
    fmr, tmr, _ = roc_curve(labels, scores)
    return auc(fmr, tmr)


def official_accuracy(labels, scores, threshold):
    return np.mean(np.where(scores > threshold, 1, 0) == labels)


def official_rank(labels, scores, n):
    """Insert each genuine score in front of all impostors, sort descending, is it in the top n?

    As the official loop, but with a stable sort: the official default sort leaves the order of
    tied scores to the NumPy build (see pipeline/metrics/verification.py).
    """
    impostors = scores[labels == 0]
    hits = []
    for genuine in scores[labels == 1]:
        ranked_scores = np.insert(impostors, 0, genuine)
        ranked_labels = np.insert(np.zeros(len(impostors)), 0, 1)
        ranked_labels = ranked_labels[np.argsort(ranked_scores, kind="stable")[::-1]]
        hits.append(ranked_labels[:n].sum())
    return np.mean(hits)


def official_report(labels, scores, subjects):
    global_eer, threshold = official_eer(labels, scores)
    expected = {
        "global": {
            "eer": global_eer,
            "eer_threshold": threshold,
            **{fnmr_key(t): official_fnmr_at_fmr(labels, scores, t) for t in FMR_TARGETS},
            "auc": official_auc(labels, scores),
            "accuracy": official_accuracy(labels, scores, threshold),
            "rank1": official_rank(labels, scores, 1),
            "genuine": int(labels.sum()),
            "impostor": int((labels == 0).sum()),
        }
    }
    per_subject, skipped = [], 0
    for subject in np.unique(subjects):
        mine = subjects == subject
        y, s = labels[mine], scores[mine]
        if y.all() or not y.any():
            skipped += 1
            continue
        subject_eer, subject_threshold = official_eer(y, s)
        per_subject.append(
            (subject_eer, official_auc(y, s), official_accuracy(y, s, subject_threshold), official_rank(y, s, 1))
        )
    if per_subject:
        eers, aucs, accuracies, rank1s = zip(*per_subject)
        expected["mean_per_subject"] = {
            "eer": np.mean(eers),
            "auc": np.mean(aucs),
            "accuracy": np.mean(accuracies),
            "rank1": np.mean(rank1s),
            "subjects": len(per_subject),
            "subjects_skipped": skipped,
        }
    return expected


def assert_reports_equal(got, expected):
    assert got.keys() == expected.keys()
    for block in expected:
        assert got[block].keys() == expected[block].keys()
        for key, value in expected[block].items():
            if np.isinf(value):  # the EER threshold is +inf when no finite threshold beats the first point
                assert got[block][key] == value, (block, key)
            else:
                assert got[block][key] == pytest.approx(value, abs=TOL, rel=0), (block, key)


# ---- random score lists, tie-heavy half of the time -----------------------------------------


@st.composite
def comparisons(draw, max_subjects=1, max_size=60):
    n = draw(st.integers(2, max_size))
    labels = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    assume(0 < labels.sum() < n)
    if draw(st.booleans()):
        values = st.integers(-3, 3).map(float)
    else:
        values = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
    scores = np.array(draw(st.lists(values, min_size=n, max_size=n)))
    subjects = np.array(draw(st.lists(st.integers(0, max_subjects - 1), min_size=n, max_size=n)))
    return labels, scores, subjects


@settings(max_examples=60, deadline=None)
@given(comparisons())
def test_each_metric_equals_the_official_formula(data):
    labels, scores, _ = data
    got_eer, got_threshold = eer(labels, scores)
    want_eer, want_threshold = official_eer(labels, scores)
    assert got_eer == pytest.approx(want_eer, abs=TOL) and got_threshold == want_threshold
    for target in FMR_TARGETS:
        want = official_fnmr_at_fmr(labels, scores, target)
        assert fnmr_at_fmr(labels, scores, target) == pytest.approx(want, abs=TOL)
    assert roc_auc(labels, scores) == pytest.approx(official_auc(labels, scores), abs=TOL)
    assert accuracy(labels, scores, want_threshold) == official_accuracy(labels, scores, want_threshold)


@settings(max_examples=80, deadline=None)
@given(comparisons(), st.integers(1, 4))
def test_rank_n_equals_the_official_loop(data, n):
    labels, scores, _ = data
    assert rank_n(labels, scores, n) == pytest.approx(official_rank(labels, scores, n), abs=TOL)


@settings(max_examples=75, deadline=None)
@given(comparisons(max_subjects=6, max_size=80))
def test_report_equals_the_official_formulas_globally_and_per_subject(data):
    labels, scores, subjects = data
    expected = official_report(labels, scores, subjects)
    assume("mean_per_subject" in expected)  # some subject has both kinds of comparison
    assert_reports_equal(verification_report(labels, scores, subjects), expected)


def test_per_subject_block_on_many_subjects_with_ties():
    rng = np.random.default_rng(7)
    n = 8_000
    labels = (rng.random(n) < 0.2).astype(int)
    scores = (rng.integers(0, 8, n) + 2 * labels).astype(float)
    subjects = np.char.add("user", rng.integers(0, 80, n).astype(str))  # string ids, as in KVC
    assert_reports_equal(verification_report(labels, scores, subjects), official_report(labels, scores, subjects))


def test_per_subject_metrics_swept_a_few_subjects_at_a_time_are_bit_identical(monkeypatch):
    """A split scored on every impostor pair is swept in groups of subjects to bound memory;
    no value may change (a subject larger than a group is a group of its own)."""
    rng = np.random.default_rng(3)
    n = 6_000
    labels = (rng.random(n) < 0.2).astype(np.int8)
    scores = (rng.integers(0, 8, n) + 2 * labels).astype(float)
    subjects = (rng.random(n) ** 2 * 60).astype(int)  # 20 to 800 comparisons a subject
    subjects[np.flatnonzero(labels == 1)[:5]] = 99  # genuine comparisons only: skipped
    whole = per_subject_metrics(labels, scores, subjects)
    assert 99 in whole.skipped
    monkeypatch.setattr(per_subject_module, "SWEEP_COMPARISONS", 150)  # several subjects, or one, a group
    in_groups = per_subject_metrics(labels, scores, subjects)
    for field in ("subjects", "eer", "eer_threshold", "auc", "accuracy", "rank1", "skipped"):
        np.testing.assert_array_equal(getattr(in_groups, field), getattr(whole, field))


def test_a_genuine_score_tied_with_the_best_impostor_is_not_rank_1():
    labels, scores = np.array([1, 1, 0, 0]), np.array([0.9, 0.95, 0.9, 0.1])
    assert rank_n(labels, scores, n=1) == 0.5  # 0.95 is first; 0.9 ranks behind the tied impostor
    assert rank_n(labels, scores, n=2) == 1.0


# ---- edge cases ------------------------------------------------------------------------------


def test_perfect_separation_has_zero_eer_full_auc_and_rank_1():
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.2, 0.1])
    report = verification_report(labels, scores, subjects=[0, 0, 1, 0, 0, 1, 1])
    for block in ("global", "mean_per_subject"):
        assert (report[block]["eer"], report[block]["auc"], report[block]["rank1"]) == (0.0, 1.0, 1.0)
    assert report["mean_per_subject"]["subjects"] == 2


def test_the_official_operating_point_rules_are_kept_as_they_are():
    """Two consequences of the official formulas, kept so that numbers match the KVC leaderboard."""
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.2, 0.1])
    report = verification_report(labels, scores)["global"]
    # The EER threshold is the lowest genuine score, and accuracy counts score > threshold as a
    # match: that genuine comparison is counted as an error although the EER is 0.
    assert report["eer_threshold"] == 0.7
    assert report["accuracy"] == 6 / 7
    # FNMR@FMR takes the *first* curve point whose FMR is nearest to the target. With 4 impostors
    # the nearest FMR to 0.1 %, 1 % and 10 % is 0, first reached at the +inf threshold: FNMR = 1.
    assert [report[fnmr_key(t)] for t in FMR_TARGETS] == [1.0, 1.0, 1.0]


def test_all_equal_scores_are_chance_level():
    labels = np.array([1, 0, 0, 0])
    report = verification_report(labels, np.full(4, 0.5))["global"]
    assert (report["eer"], report["eer_threshold"]) == (0.5, np.inf)
    assert report["auc"] == 0.5
    assert report["accuracy"] == 0.75  # nothing scores above +inf: every comparison called impostor
    assert report["rank1"] == 0.0


def test_a_single_subject_averages_to_the_global_block():
    rng = np.random.default_rng(1)
    labels = (rng.random(500) < 0.3).astype(int)
    scores = rng.normal(size=500) + labels
    report = verification_report(labels, scores, subjects=np.full(500, "only"))
    for key in ("eer", "auc", "accuracy", "rank1"):
        assert report["mean_per_subject"][key] == pytest.approx(report["global"][key], abs=TOL)
    assert report["mean_per_subject"]["subjects"] == 1


def test_subjects_without_genuine_or_impostor_comparisons_are_skipped_and_counted():
    labels = [1, 0, 1, 1, 0, 0]
    scores = [0.9, 0.1, 0.8, 0.7, 0.2, 0.3]
    subjects = ["a", "a", "b", "b", "c", "c"]  # b: genuine only, c: impostor only
    block = verification_report(labels, scores, subjects)["mean_per_subject"]
    assert (block["subjects"], block["subjects_skipped"], block["eer"]) == (1, 2, 0.0)


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([1, 0, 1], [0.1, 0.2], "differ in length"),
        ([1, 1, 1], [0.1, 0.2, 0.3], "at least one genuine .* and one impostor"),
        ([0, 0], [0.1, 0.2], "at least one genuine .* and one impostor"),
        ([], [], "at least one genuine"),
        ([1, 0, 0], [0.1, np.nan, 0.3], "1 of 3 are NaN or infinite"),
        ([1, 0, 0], [0.1, np.inf, 0.3], "NaN or infinite"),
        ([1, 0, 2], [0.1, 0.2, 0.3], r"1 \(genuine\) or 0 \(impostor\); found \[2\]"),
        ([[1, 0]], [[0.1, 0.2]], "must be 1-D"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(labels, scores, message):
    for metric in (verification_report, roc_auc, rank_n, lambda y, s: eer(y, s), lambda y, s: accuracy(y, s, 0.5)):
        with pytest.raises(ValueError, match=message):
            metric(labels, scores)


def test_bad_subjects_and_rank_are_refused():
    with pytest.raises(ValueError, match="one id per comparison"):
        verification_report([1, 0, 0], [0.3, 0.2, 0.1], subjects=[1, 2])
    with pytest.raises(ValueError, match="no subject has both"):
        verification_report([1, 0], [0.3, 0.2], subjects=["a", "b"])
    with pytest.raises(ValueError, match="positive integer"):
        rank_n([1, 0], [0.3, 0.2], n=0)


# ---- rendering ---------------------------------------------------------------------------------


def test_markdown_table_shows_both_blocks_in_percent():
    text = report_to_markdown(
        verification_report([1, 1, 0, 0, 0], [0.9, 0.4, 0.5, 0.2, 0.1], subjects=[1, 2, 1, 2, 2])
    )
    header, rule, global_row, subject_row = text.splitlines()[:4]
    assert header.split("|")[2:4] == [" EER [%] ", " FNMR@0.1%FMR [%] "]
    assert rule.count("--:") == 7
    assert global_row.startswith("| Global | 41.67 |")  # EER = (1/3 + 1/2) / 2
    assert subject_row.startswith("| Mean per subject | 0.00 | – | – | – | 100.00 |")
    assert "2 genuine and 3 impostor comparisons" in text
    assert "over 2 subjects (0 skipped" in text


def test_markdown_without_subjects_has_only_the_global_row():
    text = report_to_markdown(verification_report([1, 0], [0.9, 0.1]))
    assert "| Global |" in text and "Mean per subject" not in text


def test_det_plot_writes_a_png_with_several_curves(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random(5_000) < 0.2).astype(int)
    curves = {
        "good": Roc.of(*validate(labels, rng.normal(size=5_000) + 3 * labels)),
        "weak": Roc.of(*validate(labels, rng.normal(size=5_000) + labels)),
    }
    path = plot_det(curves, tmp_path / "plots" / "det.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one curve"):
        plot_det({}, tmp_path / "empty.png")
