"""A hand-crafted keystroke baseline: the yardstick that calibrates the synthetic corpus.

Each session becomes a small vector — mean and std of log hold and log flight times and the
mean log hold of the ten most frequent English keys — z-normalised over all sessions; a
comparison scores ``-distance`` between its two sessions. Deliberately simple: if it reaches
0 % EER the corpus is too easy to tell losses apart; if it is near 50 % it is noise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.metrics import eer
from sharding.kvc import read_comparisons, read_test_sessions
from sharding.synth import kvc_paths

FREQUENT_KEYS = (32, 69, 84, 65, 79, 73, 78, 83, 82, 72)  # space e t a o i n s r h


def session_features(session: np.ndarray) -> np.ndarray:
    """``[mean, std]`` of log hold and log flight, then mean log hold per frequent key."""
    press, release, code = np.asarray(session, dtype=np.float64).T
    hold = np.log(np.clip(release - press, 1, 2000))
    flight = np.log(np.clip(np.diff(press), 1, 3000)) if len(press) > 1 else np.zeros(1)
    match = code[None, :] == np.array(FREQUENT_KEYS)[:, None]
    counts = match.sum(axis=1)
    per_key = np.where(counts > 0, match @ hold / np.maximum(counts, 1), hold.mean())
    return np.concatenate([[hold.mean(), hold.std(), flight.mean(), flight.std()], per_key])


def baseline_scores(sessions: Mapping[str, np.ndarray],
                    comparisons: Sequence[tuple[str, str]]) -> np.ndarray:
    """Similarity (higher = more likely the same subject) for each comparison."""
    ids = list(sessions)
    row = {sid: i for i, sid in enumerate(ids)}
    features = np.stack([session_features(sessions[sid]) for sid in ids])
    features = (features - features.mean(0)) / (features.std(0) + 1e-9)
    a = features[[row[x] for x, _ in comparisons]]
    b = features[[row[y] for _, y in comparisons]]
    return -np.linalg.norm(a - b, axis=1)


def baseline_eer(root: str | Path, scenario: str) -> float:
    """Baseline EER on a synthetic corpus written by :func:`sharding.synth.write_kvc`."""
    paths = kvc_paths(root, scenario)
    labels = json.loads(paths.ground_truth.read_text())["labels"]
    comparisons = read_comparisons(paths.comparisons)
    scores = baseline_scores(read_test_sessions(paths.test_sessions), comparisons)
    return eer(labels, scores)[0]
