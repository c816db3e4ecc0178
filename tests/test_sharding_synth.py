"""The synthetic corpus: exact KVC format, realistic values, determinism, calibrated difficulty."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.metrics import eer
from sharding.baseline import baseline_eer, baseline_scores
from sharding.kvc import read_comparisons, read_dev_set, read_test_sessions
from sharding.synth import SCENARIOS, SynthCorpus, evaluation_set, write_kvc


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sessions_look_like_kvc_keystrokes(scenario: str) -> None:
    corpus = SynthCorpus(scenario, seed=1)
    for i in range(20):
        sessions = corpus.subject(i)
        assert len(sessions) == 15 and len(corpus.subject_id(i)) == 8
        for table in sessions.values():
            press, release, code = table.T
            assert table.dtype == np.int64 and table.shape[1] == 3
            assert 30 <= len(table) <= 110
            assert (release >= press).all() and (np.diff(press) >= 0).all()
            assert (press > 1_400_000_000_000).all() and (press < 1_600_000_000_000).all()
            assert set(np.unique(code)) <= {8, 16, 32, 188, 190, 222, 229, *range(65, 91)}
            hold = np.median(release - press)
            assert 30 < hold < 300, hold


def test_subjects_are_deterministic_per_seed_and_independent_of_order() -> None:
    a, b = SynthCorpus(seed=4), SynthCorpus(seed=4)
    for i in (7, 3, 0):
        for x, y in zip(a.subject(i).values(), b.subject(i).values()):
            np.testing.assert_array_equal(x, y)
    other = SynthCorpus(seed=5).subject(3)
    assert any(not np.array_equal(x, y) for x, y in zip(a.subject(3).values(), other.values()))
    assert len({a.subject_id(i) for i in range(10_000)}) == 10_000


def test_subjects_differ_more_from_each_other_than_from_themselves() -> None:
    """Mean log hold time: sessions of one subject cluster, subjects spread (KVC-like, not trivial)."""
    corpus = SynthCorpus(seed=0)
    means = np.array([[np.log(t[:, 1] - t[:, 0] + 1).mean() for t in corpus.subject(i).values()]
                      for i in range(200)])
    within, between = means.std(axis=1).mean(), means.mean(axis=1).std()
    assert 1.2 < between / within < 6


def test_written_files_are_the_kvc_format_with_ground_truth(tmp_path: Path) -> None:
    paths = write_kvc(tmp_path, scenario="mobile", subjects=12, test_subjects=4, seed=3)
    assert paths.dev_set == tmp_path / "mobile" / "mobile_dev_set.npy"
    corpus = SynthCorpus("mobile", seed=3)
    dev = read_dev_set(paths.dev_set)
    assert [user for user, _ in dev] == [corpus.subject_id(i) for i in range(12)]
    np.testing.assert_array_equal(dev[5][1]["502"], corpus.subject(5)["502"])

    sessions = read_test_sessions(paths.test_sessions)
    comparisons = read_comparisons(paths.comparisons)
    truth = json.loads(paths.ground_truth.read_text())
    assert paths.comparisons.read_text().count("\n") == 1
    assert len(sessions) == 4 * 15 and len(truth["labels"]) == len(comparisons) == 4 * 2 * 5 * 10
    owner = truth["session_subject"]
    assert set(owner.values()) == {corpus.subject_id(i) for i in range(12, 16)}
    assert [int(owner[a] == owner[b]) for a, b in comparisons] == truth["labels"]
    assert sum(truth["labels"]) == len(comparisons) // 2


def test_difficulty_is_calibrated_for_a_handcrafted_baseline(tmp_path: Path) -> None:
    """The default leaves a simple feature baseline at 10-25 % EER; the knob moves it."""
    write_kvc(tmp_path, subjects=2, test_subjects=300, seed=11)
    default = baseline_eer(tmp_path, "desktop")
    assert 0.10 < default < 0.25, default
    rates = []
    for difficulty in (0.4, 2.0):
        corpus = SynthCorpus(seed=11, difficulty=difficulty)
        sessions, comparisons, labels, _ = evaluation_set(corpus, range(300))
        rates.append(eer(labels, baseline_scores(sessions, comparisons))[0])
    assert rates[0] < default - 0.05 and rates[1] > default + 0.05, (rates, default)


def test_an_evaluation_set_s_impostors_cost_what_its_comparisons_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """KVC's 15,000 evaluation subjects: impostor sessions are drawn among every other subject's
    verification sessions without scanning them all per subject (that made the set quadratic);
    the elements the draws look at stay within a few per comparison."""
    corpus = SynthCorpus(seed=0)
    made = {i: corpus.subject(i) for i in range(300)}  # the subjects' synthesis is not counted
    monkeypatch.setattr(SynthCorpus, "subject", lambda self, index: made[index])
    scanned = []
    flatnonzero = np.flatnonzero
    monkeypatch.setattr(np, "flatnonzero", lambda a: scanned.append(np.size(a)) or flatnonzero(a))
    sessions, comparisons, labels, owner = evaluation_set(corpus, range(300))
    assert sum(scanned) <= 3 * len(comparisons) + len(sessions)
    impostors = [(a, b) for (a, b), label in zip(comparisons, labels) if not label]
    assert len(impostors) == len(comparisons) // 2 and all(owner[a] != owner[b] for a, b in impostors)
    assert len({owner[b] for _, b in impostors}) > 280  # drawn across the other subjects


def test_the_evaluation_files_alone_hold_the_subjects_after_the_dev_set(tmp_path: Path) -> None:
    """How a rehearsal at KVC's size writes them: the dev subjects are sharded from synth:N instead."""
    paths = write_kvc(tmp_path, subjects=50, test_subjects=3, seed=0, dev_set=False)
    assert not paths.dev_set.exists()
    owners = set(json.loads(paths.ground_truth.read_text())["session_subject"].values())
    assert owners == {SynthCorpus(seed=0).subject_id(i) for i in (50, 51, 52)}
