"""Verification protocols: which comparisons a split's embeddings are scored on, and the report.

A protocol turns a split's embeddings and labels into :class:`Comparisons` — truth, score
(higher = more similar, as the KVC metrics expect) and the subject each comparison is
attributed to (for the mean per-subject block of the report). :func:`verify` runs one and
reports. Validation, ``eerpipe evaluate`` and the experiments all score through here, so the
same model gets the same numbers everywhere.

:class:`SessionPairs` (the default) compares session with session:

* genuine: every unordered pair of sessions of the same subject;
* impostor: for each session, ``impostors_per_session`` sessions of other subjects drawn with a
  fixed seed, so that two models are scored on the very same comparisons.

Another protocol (e.g. KVC's enrolment sets: a session against the mean score over a subject's
enrolment sessions) is another class with the same ``compare`` method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.metrics import verification_report

_PAIR_CHUNK = 1 << 16


@dataclass(frozen=True)
class Comparisons:
    """Scored comparisons of one split."""

    truth: np.ndarray  # int, 1 = genuine
    scores: np.ndarray  # float64, higher = more similar
    subjects: np.ndarray  # the label each comparison is attributed to


class VerificationProtocol(Protocol):
    def compare(self, embeddings: torch.Tensor, labels: np.ndarray, distance: str) -> Comparisons: ...


@dataclass(frozen=True)
class SessionPairs:
    """Session against session (see the module docstring)."""

    impostors_per_session: int = 10
    seed: int = 0

    def compare(self, embeddings: torch.Tensor, labels: np.ndarray, distance: str) -> Comparisons:
        first, second, truth = comparisons(labels, self.impostors_per_session, self.seed)
        scores = pair_scores(embeddings.detach().float().cpu(), first, second, distance)
        return Comparisons(truth.astype(int), scores, np.asarray(labels)[first])


def comparisons(
    labels: np.ndarray, impostors_per_session: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(first, second, is_genuine)`` row indices of the session-pairs protocol's comparisons."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    first, second = [], []
    for members in np.split(order, bounds):
        a, b = np.triu_indices(len(members), 1)
        first.append(members[a])
        second.append(members[b])
    genuine_first, genuine_second = np.concatenate(first), np.concatenate(second)

    rng = np.random.default_rng(seed)
    anchor = np.repeat(np.arange(len(labels)), impostors_per_session)
    other = rng.integers(0, len(labels), size=anchor.size)
    clash = labels[other] == labels[anchor]
    while clash.any() and len(np.unique(labels)) > 1:  # redraw same-subject picks
        other[clash] = rng.integers(0, len(labels), size=int(clash.sum()))
        clash = labels[other] == labels[anchor]
    is_genuine = np.r_[np.ones(genuine_first.size, bool), np.zeros(anchor.size, bool)]
    return np.r_[genuine_first, anchor], np.r_[genuine_second, other], is_genuine


def pair_scores(embeddings: torch.Tensor, first: np.ndarray, second: np.ndarray, distance: str) -> np.ndarray:
    """``−distance`` between rows ``first[i]`` and ``second[i]``, in chunks to bound memory."""
    if distance == "cosine":
        embeddings = nn.functional.normalize(embeddings, dim=1)
    elif distance != "euclidean":
        raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
    scores = []
    for start in range(0, len(first), _PAIR_CHUNK):
        a = embeddings[torch.as_tensor(first[start : start + _PAIR_CHUNK])]
        b = embeddings[torch.as_tensor(second[start : start + _PAIR_CHUNK])]
        gap = (1 - (a * b).sum(1)) if distance == "cosine" else (a - b).norm(dim=1)
        scores.append(-gap.double().numpy())
    return np.concatenate(scores) if scores else np.zeros(0)


def verify(
    embeddings: torch.Tensor,
    labels: np.ndarray,
    *,
    impostors_per_session: int = 10,
    distance: str = "euclidean",
    seed: int = 0,
    protocol: VerificationProtocol | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The full KVC report of a split's embeddings under ``protocol`` (default: session pairs
    with ``impostors_per_session`` and ``seed``), plus the comparisons' truth and scores."""
    protocol = protocol or SessionPairs(impostors_per_session, seed)
    scored = protocol.compare(embeddings, labels, distance)
    report = verification_report(scored.truth, scored.scores, subjects=scored.subjects)
    return report, scored.truth, scored.scores
