"""The verification protocols: which comparisons a split is scored on, and how.

Session pairs compare session with session; KVC's protocol compares a verification session
with a subject's enrolment set, scored by the mean over the set. Either draws a few impostor
comparisons per session, or takes every one (``"all"``: what a low FMR needs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation.protocol import (
    EnrolmentSets,
    SessionPairs,
    check_report_fits,
    every_comparison_count,
    pair_scores,
    protocol_from,
    verify,
)

SUBJECTS, SESSIONS = 20, 15


def split_labels(sessions: int = SESSIONS) -> np.ndarray:
    """Rows of a split as the loaders give them: each subject's sessions, subjects interleaved."""
    return np.tile(np.arange(SUBJECTS) * 7 + 3, sessions)  # labels need not be 0..S-1


def test_every_verification_session_meets_its_own_set_once_and_distinct_other_sets() -> None:
    labels = split_labels()
    sets, set_labels, probe, claimed, genuine = EnrolmentSets(5, 10).draw(labels)
    assert sets.shape == (SUBJECTS, 5) and sorted(set_labels) == sorted(np.unique(labels))
    verified = probe[genuine]
    assert len(verified) == len(set(verified)) == SUBJECTS * (SESSIONS - 5)
    assert (set_labels[claimed[genuine]] == labels[verified]).all()
    impostor_sets = claimed[~genuine].reshape(-1, 10)
    assert (set_labels[impostor_sets] != labels[probe[~genuine]].reshape(-1, 10)).all()
    assert all(len(set(row)) == 10 for row in impostor_sets.tolist())


def test_enrolment_sessions_are_never_verified() -> None:
    labels = split_labels()
    sets, set_labels, probe, _, _ = EnrolmentSets(5, 3).draw(labels)
    assert not set(sets.ravel()) & set(probe)
    for members, subject in zip(sets, set_labels):
        assert (labels[members] == subject).all()


def test_the_score_is_the_mean_negative_distance_to_the_claimed_set() -> None:
    labels = split_labels()
    embeddings = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(0))
    protocol = EnrolmentSets(5, 3)
    sets, _, probe, claimed, genuine = protocol.draw(labels)
    for distance in ("cosine", "euclidean"):
        scored = protocol.compare(embeddings, labels, distance)
        rows = embeddings if distance == "euclidean" else torch.nn.functional.normalize(embeddings, dim=1)
        for i in (0, 7, len(probe) - 1):
            gaps = [
                float((rows[probe[i]] - rows[j]).norm()) if distance == "euclidean"
                else 1 - float(rows[probe[i]] @ rows[j])
                for j in sets[claimed[i]]
            ]
            assert scored.scores[i] == pytest.approx(-np.mean(gaps), abs=1e-6)
        assert (scored.truth == genuine).all()


def test_two_models_are_scored_on_the_same_comparisons() -> None:
    labels = split_labels()
    first, second = EnrolmentSets(5, 10, seed=0).draw(labels), EnrolmentSets(5, 10, seed=0).draw(labels)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_each_comparison_belongs_to_the_subject_whose_set_it_claims() -> None:
    labels = split_labels()
    embeddings = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(1))
    verified = verify(embeddings, labels, EnrolmentSets(5, 10), "cosine")
    assert verified.report["mean_per_subject"]["subjects"] == SUBJECTS
    assert verified.report["global"]["genuine"] == verified.truth.sum() == SUBJECTS * 10


def test_the_curve_kept_for_checkpoint_selection_is_the_one_the_report_was_read_from() -> None:
    labels = split_labels()
    embeddings = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(3))
    verified = verify(embeddings, labels, SessionPairs(10), "cosine")
    assert verified.curve.eer() == (verified.report["global"]["eer"], verified.report["global"]["eer_threshold"])
    assert verified.curve.fnmr_at(1e-3) == verified.report["global"]["fnmr_at_fmr_0.1%"]


def test_subjects_without_a_session_left_to_verify_are_left_out() -> None:
    labels = np.r_[split_labels(), np.full(5, 999)]  # a subject with exactly the enrolment sessions
    sets, set_labels, probe, _, _ = EnrolmentSets(5, 3).draw(labels)
    assert 999 not in set_labels and not (labels[probe] == 999).any()


def test_a_split_too_small_for_enrolment_sets_is_refused() -> None:
    with pytest.raises(ValueError, match="needs two subjects with more than 5 sessions"):
        EnrolmentSets(5, 3).draw(np.repeat([1, 2], 5))


def test_impostor_sets_are_capped_by_the_other_subjects() -> None:
    _, _, _, claimed, genuine = EnrolmentSets(5, 50).draw(split_labels())
    assert (~genuine).sum() == SUBJECTS * (SESSIONS - 5) * (SUBJECTS - 1)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_all_impostors_compares_every_pair_of_sessions_once_as_the_pairwise_scores_do(monkeypatch, distance) -> None:
    """Row i against rows i+1 … (the upper triangle, row by row), blocks of rows at a time."""
    import pipeline.evaluation.protocol

    monkeypatch.setattr(pipeline.evaluation.protocol, "_ROW_BLOCK", 7)  # blocks that split subjects
    labels = split_labels()
    embeddings = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(3))
    scored = SessionPairs("all").compare(embeddings, labels, distance)
    first, second = np.triu_indices(len(labels), 1)
    np.testing.assert_array_equal(scored.truth, labels[first] == labels[second])
    np.testing.assert_array_equal(scored.subjects, labels[first])
    np.testing.assert_allclose(scored.scores, pair_scores(embeddings, first, second, distance), rtol=0, atol=1e-6)
    assert scored.truth.sum() == SUBJECTS * SESSIONS * (SESSIONS - 1) // 2


def test_with_every_impostor_pair_the_session_report_does_not_depend_on_the_order_of_the_rows() -> None:
    # so a run's validation (rows in the ranks' gathered order) and `eerpipe evaluate` (file order)
    # score a model alike; enrolment sets are still drawn by row position
    labels = split_labels()
    embeddings = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(2))
    shuffled = np.random.default_rng(0).permutation(len(labels))
    as_given = verify(embeddings, labels, SessionPairs("all"), "cosine").report
    reordered = verify(embeddings[shuffled], labels[shuffled], SessionPairs("all"), "cosine").report
    for key in ("eer", "fnmr_at_fmr_1%", "fnmr_at_fmr_0.1%", "genuine", "impostor"):
        assert reordered["global"][key] == pytest.approx(as_given["global"][key])


def test_all_impostor_sets_meets_every_other_subject_s_set() -> None:
    _, set_labels, probe, claimed, genuine = EnrolmentSets(5, "all").draw(split_labels())
    assert (~genuine).sum() == SUBJECTS * (SESSIONS - 5) * (SUBJECTS - 1)
    met = claimed[~genuine].reshape(-1, SUBJECTS - 1)
    assert all(len(set(row)) == SUBJECTS - 1 for row in met.tolist())


def test_every_comparison_is_counted_before_a_split_is_scored() -> None:
    labels = split_labels()
    for protocol in (SessionPairs("all"), EnrolmentSets(5, "all")):
        scored = protocol.compare(torch.randn(len(labels), 8), labels, "cosine")
        assert every_comparison_count(protocol, len(labels), SUBJECTS) == len(scored.truth)
    assert every_comparison_count(SessionPairs(10), len(labels), SUBJECTS) is None  # a drawn count: bounded


def test_every_impostor_pair_of_a_split_too_large_for_memory_is_refused_naming_a_count_that_fits() -> None:
    check_report_fits(SessionPairs("all"), 4_500, 300, "the test split")  # 10 M comparisons, 0.75 GB
    with pytest.raises(ValueError, match=r"the test split: eval.impostors_per_session=all makes 49,999,995,000,000 "
                                         r"comparisons of its 10,000,000 sessions under the session protocol, about "
                                         r"\d+ GB to score, more than the \d+ GB it may take \(three quarters of the "
                                         r"memory available\); set a count per session "
                                         r"instead \(e.g. eval.impostors_per_session=\d+\)"):
        check_report_fits(SessionPairs("all"), 10_000_000, 1_000_000, "the test split")
    check_report_fits(SessionPairs(1000), 10_000_000, 1_000_000, "the test split")


def test_the_config_names_the_protocol_and_the_session_protocol_is_the_default() -> None:
    assert protocol_from({"impostors_per_session": 4}) == SessionPairs(4)
    assert protocol_from({"impostors_per_session": "all", "protocol": "kvc"}) == EnrolmentSets(5, "all")
    assert (protocol_from({"impostors_per_session": 4, "protocol": "kvc", "enrolment_sessions": 3})
            == EnrolmentSets(3, 4))
    assert protocol_from({"impostors_per_session": 4, "protocol": "kvc"}, "session") == SessionPairs(4)
    with pytest.raises(ValueError, match="protocol must be 'session' or 'kvc'"):
        protocol_from({"impostors_per_session": 4}, "enrolment")
