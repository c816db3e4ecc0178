"""Verification protocols: which comparisons a split's embeddings are scored on, and the report.

A protocol turns a split's embeddings and labels into :class:`Comparisons` — truth, score
(higher = more similar, as the KVC metrics expect) and the subject each comparison is
attributed to (for the mean per-subject block of the report). :func:`verify` runs one and
reports. Validation, ``eerpipe evaluate`` and the experiments all score through here, so the
same model gets the same numbers everywhere.

:class:`SessionPairs` (the default) compares session with session:

* genuine: every unordered pair of sessions of the same subject;
* impostor: for each session, ``impostors_per_session`` sessions of other subjects drawn with a
  fixed seed, so that two models are scored on the very same comparisons; or, with ``"all"``,
  every unordered pair of sessions of different subjects.

:class:`EnrolmentSets` (``protocol: kvc``) is KVC-onGoing's: per subject, a few enrolment
sessions drawn with a fixed seed, the others verified against enrolment sets — their own
(genuine) and other subjects' (impostor) — with the mean ``−distance`` over the set as the score.
Published keystroke numbers use enrolment sets, so this is the protocol to compare them with.

Why ``"all"``: the FNMR at FMR 0.1 % is read at the threshold that a thousandth of the impostor
comparisons pass. Ten impostors per session on a split of 300 subjects put that threshold on ~45
comparisons, so two models' numbers there differ by sampling as much as by training
(docs/results.md, "Where the results disagree"). Every impostor pair costs ``n²/2``
comparisons for ``n`` sessions — millions for a split of a few hundred subjects, affordable at
each validation — and leaves no draw to depend on. Their exact report holds every comparison in
memory several times over (:data:`REPORT_BYTES_PER_COMPARISON`): a split of 1,200 subjects of 15
sessions makes 162 M, 11.1 GB measured. :func:`check_report_fits` refuses a scoring that would not
fit before it starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, Protocol, cast, get_args

import numpy as np
import psutil
import torch
from torch import nn

from pipeline.metrics import verification_report
from pipeline.metrics.verification import Roc, validate

_PAIR_CHUNK = 1 << 16
_ROW_BLOCK = 256  # rows of an every-pair block: 256 × 18,000 sessions of float32 distances, 18 MB
ProtocolName = Literal["session", "kvc"]


def protocol_name(text: str | None) -> ProtocolName | None:
    """``--protocol`` as given (``None``: the model's validation protocol), or one line naming the choices."""
    names = get_args(ProtocolName)
    if text is None or text in names:
        return cast("ProtocolName | None", text)
    raise ValueError(f"--protocol must be one of {', '.join(names)}, got {text!r}")
ALL: Final = "all"  # as ``impostors_per_session``: every impostor comparison the split has
Impostors = int | Literal["all"]


@dataclass(frozen=True)
class Comparisons:
    """Scored comparisons of one split."""

    truth: np.ndarray  # int8, 1 = genuine
    scores: np.ndarray  # float64, higher = more similar
    subjects: np.ndarray  # the label each comparison is attributed to


class VerificationProtocol(Protocol):
    name: ClassVar[str]  # as ``eval.protocol`` and ``--protocol`` name it

    def compare(self, embeddings: torch.Tensor, labels: np.ndarray, distance: str) -> Comparisons: ...


@dataclass(frozen=True)
class SessionPairs:
    """Session against session (see the module docstring)."""

    impostors_per_session: Impostors = 10
    seed: int = 0
    name: ClassVar[str] = "session"

    def compare(self, embeddings: torch.Tensor, labels: np.ndarray, distance: str) -> Comparisons:
        if self.impostors_per_session == ALL:
            return every_pair(embeddings, labels, distance)
        first, second, truth = comparisons(labels, self.impostors_per_session, self.seed)
        scores = pair_scores(embeddings, first, second, distance)
        return Comparisons(truth.astype(np.int8), scores, np.asarray(labels)[first])


def every_pair(embeddings: torch.Tensor, labels: np.ndarray, distance: str) -> Comparisons:
    """Every unordered pair of rows once, in the upper triangle's row-major order (row ``i``
    against rows ``i+1 …``), attributed to row ``i``'s subject.

    A block of rows at a time against every later row, by one matrix product for the cosine
    distance: no index arrays (two 8-byte indices per comparison, 2.6 GB for the 161 M pairs of
    1,200 subjects) and no gathered rows. Scores equal :func:`pair_scores`' up to float32 rounding
    (a product sums in another order)."""
    labels = np.asarray(labels)
    prepared, n = _prepared(embeddings, distance), len(labels)
    count = n * (n - 1) // 2
    truth, scores, subjects = np.empty(count, np.int8), np.empty(count), np.empty(count, labels.dtype)
    end = 0
    for start in range(0, n, _ROW_BLOCK):
        block = -_distances(prepared[start : start + _ROW_BLOCK], prepared[start:], distance).double().numpy()
        for offset, row in enumerate(range(start, min(start + _ROW_BLOCK, n))):
            begin, end = end, end + n - row - 1
            scores[begin:end] = block[offset, offset + 1 :]
            truth[begin:end] = labels[row + 1 :] == labels[row]
            subjects[begin:end] = labels[row]
    return Comparisons(truth, scores, subjects)


def comparisons(
    labels: np.ndarray, impostors_per_session: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(first, second, is_genuine)`` row indices of the session-pairs protocol's comparisons
    with ``impostors_per_session`` drawn impostors (every pair: :func:`every_pair`)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    first_parts, second_parts = [], []
    for members in np.split(order, bounds):
        a, b = np.triu_indices(len(members), 1)
        first_parts.append(members[a])
        second_parts.append(members[b])
    genuine_first, genuine_second = np.concatenate(first_parts), np.concatenate(second_parts)

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
    embeddings = _prepared(embeddings, distance)
    scores = []
    for start in range(0, len(first), _PAIR_CHUNK):
        a = embeddings[torch.as_tensor(first[start : start + _PAIR_CHUNK])]
        b = embeddings[torch.as_tensor(second[start : start + _PAIR_CHUNK])]
        scores.append(-_distance(a, b, distance).double().numpy())
    return np.concatenate(scores) if scores else np.zeros(0)


@dataclass(frozen=True)
class EnrolmentSets:
    """KVC's protocol: verification sessions against subjects' enrolment sets.

    Per subject, ``enrolment_sessions`` sessions drawn with ``seed`` form its enrolment set; the
    others are verification sessions. Each verification session is compared with its own
    subject's set (genuine) and with ``impostor_sets`` distinct other subjects' sets drawn with
    the same seed (impostor), or every other subject's set with ``impostor_sets="all"``. The
    score is the mean of ``−distance`` over the set's sessions, as KVC-onGoing scores its
    comparisons. Subjects with no session left to verify are left out; a
    comparison is attributed to the subject whose set it claims.
    """

    enrolment_sessions: int = 5
    impostor_sets: Impostors = 10
    seed: int = 0
    name: ClassVar[str] = "kvc"

    def __post_init__(self) -> None:
        if self.enrolment_sessions < 1 or (self.impostor_sets != ALL and self.impostor_sets < 1):
            raise ValueError(
                f"the enrolment protocol needs enrolment_sessions ≥ 1 and impostor sets ≥ 1, "
                f"got {self.enrolment_sessions} and {self.impostor_sets}"
            )

    def compare(self, embeddings: torch.Tensor, labels: np.ndarray, distance: str) -> Comparisons:
        sets, set_labels, probe, claimed, truth = self.draw(labels)
        embeddings = _prepared(embeddings, distance)
        members = torch.as_tensor(sets)
        scores = []
        for start in range(0, len(probe), _PAIR_CHUNK // self.enrolment_sessions):
            stop = start + _PAIR_CHUNK // self.enrolment_sessions
            probes = embeddings[torch.as_tensor(probe[start:stop])]  # [c, D]
            enrolled = embeddings[members[torch.as_tensor(claimed[start:stop])]]  # [c, E, D]
            scores.append(-_distance(probes[:, None], enrolled, distance).mean(1).double().numpy())
        return Comparisons(truth.astype(np.int8), np.concatenate(scores), set_labels[claimed])

    def draw(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(sets [S, E], set_labels [S], probe [C], claimed [C], is_genuine [C])`` as row indices.

        ``sets[claimed[i]]`` are the enrolment rows verification row ``probe[i]`` is compared with.
        """
        labels = np.asarray(labels)
        rng = np.random.default_rng(self.seed)
        sets, set_labels, probes = [], [], []
        for subject in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == subject))
            if len(rows) > self.enrolment_sessions:
                sets.append(np.sort(rows[: self.enrolment_sessions]))
                set_labels.append(subject)
                probes.append(np.sort(rows[self.enrolment_sessions :]))
        if len(sets) < 2:
            raise ValueError(
                f"the enrolment protocol needs two subjects with more than {self.enrolment_sessions} "
                f"sessions; this split has {len(sets)}"
            )
        own = np.concatenate([np.full(len(rows), index) for index, rows in enumerate(probes)])
        probe = np.concatenate(probes)
        count = len(sets) - 1 if self.impostor_sets == ALL else min(self.impostor_sets, len(sets) - 1)
        others = (
            np.broadcast_to(np.arange(count), (len(probe), count)).copy()
            if count == len(sets) - 1
            else _distinct_draws(rng, len(probe), len(sets) - 1, count)
        )
        others += others >= own[:, None]  # a draw among the S − 1 other sets, shifted past its own
        truth = np.r_[np.ones(len(probe), bool), np.zeros(others.size, bool)]
        return (np.stack(sets), np.asarray(set_labels), np.r_[probe, np.repeat(probe, count)],
                np.r_[own, others.ravel()], truth)


def _distinct_draws(rng: np.random.Generator, rows: int, population: int, count: int) -> np.ndarray:
    """``rows × count`` draws from ``range(population)``, distinct within each row.

    Rows with a repeat are drawn again; a draw of more than half the population is a shuffle
    instead, where repeats would be common.
    """
    if 2 * count > population:
        return np.argsort(rng.random((rows, population)), axis=1)[:, :count]
    draws = rng.integers(0, population, size=(rows, count))
    repeated = (np.diff(np.sort(draws, axis=1), axis=1) == 0).any(axis=1)
    while repeated.any():
        draws[repeated] = rng.integers(0, population, size=(int(repeated.sum()), count))
        repeated = (np.diff(np.sort(draws, axis=1), axis=1) == 0).any(axis=1)
    return draws


def protocol_from(settings: Mapping[str, Any], name: ProtocolName | None = None) -> VerificationProtocol:
    """The protocol an ``eval`` config section names (``name`` overrides its ``protocol``).

    ``impostors_per_session`` counts impostor comparisons per verification session in both
    protocols: sessions of other subjects, or other subjects' enrolment sets; ``"all"`` takes
    every one. Exports written before the enrolment protocol existed have no ``protocol`` key and
    mean session pairs.
    """
    name = name or settings.get("protocol", "session")
    if name == "session":
        return SessionPairs(settings["impostors_per_session"])
    if name == "kvc":
        return EnrolmentSets(settings.get("enrolment_sessions", 5), settings["impostors_per_session"])
    raise ValueError(f"protocol must be 'session' or 'kvc', got {name!r}")


def _prepared(embeddings: torch.Tensor, distance: str) -> torch.Tensor:
    """Rows ready for :func:`_distance`: unit length for the cosine distance."""
    embeddings = embeddings.detach().float().cpu()
    if distance == "cosine":
        return nn.functional.normalize(embeddings, dim=-1)
    if distance != "euclidean":
        raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
    return embeddings


def _distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """Distance along the last axis between :func:`_prepared` rows (broadcasting)."""
    return 1 - (a * b).sum(-1) if distance == "cosine" else (a - b).norm(dim=-1)


def _distances(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """Distance between every row of ``a`` and every row of ``b`` (:func:`_prepared` rows), ``[len(a), len(b)]``."""
    if distance == "cosine":
        return 1 - a @ b.T
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")  # exact differences, as _distance


# Peak memory of one comparison scored into the full report, the comparison included (its score,
# truth and subject, beside sklearn's sorted copies for the ROC, the peak; the per-subject sweep
# takes a group of subjects at a time): 70 bytes measured on the 40.5 M session pairs of 600
# subjects of 15 sessions, 2.84 GB, and 11.1 GB for the 161 M of 1,200 (150 before the sweep was
# grouped; 2026-12-06). 75 leaves a margin.
REPORT_BYTES_PER_COMPARISON: Final = 75


def every_comparison_count(protocol: VerificationProtocol, sessions: int, subjects: int) -> int | None:
    """How many comparisons ``protocol`` makes with every impostor (``"all"``) on a split of
    ``sessions`` sessions of ``subjects`` subjects (at most that, under enrolment sets); None for a
    protocol that draws a fixed number per session."""
    if isinstance(protocol, SessionPairs) and protocol.impostors_per_session == ALL:
        return sessions * (sessions - 1) // 2
    if isinstance(protocol, EnrolmentSets) and protocol.impostor_sets == ALL:
        return max(sessions - subjects * protocol.enrolment_sessions, 0) * subjects
    return None


def check_report_fits(protocol: VerificationProtocol, sessions: int, subjects: int, where: str,
                      setting: str = "eval.impostors_per_session") -> None:
    """Refuse, in one line naming the setting (as the user gave it) and a count that fits, scoring
    every impostor comparison of a split whose report would need more than three quarters of this
    machine's available memory."""
    count = every_comparison_count(protocol, sessions, subjects)
    available = psutil.virtual_memory().available
    usable = available * 3 // 4  # the rest for the process's own (its embeddings, other arms' results)
    if count is None or count * REPORT_BYTES_PER_COMPARISON <= usable:
        return
    fitting = max(1, usable // (2 * REPORT_BYTES_PER_COMPARISON * sessions))
    raise ValueError(
        f"{where}: {setting}=all makes {count:,} comparisons of its {sessions:,} sessions under "
        f"the {protocol.name} protocol, about {count * REPORT_BYTES_PER_COMPARISON / 1e9:.0f} GB to score, more than "
        f"the {usable / 1e9:.0f} GB it may take (three quarters of the memory available); set a count per "
        f"session instead (e.g. {setting}={fitting})"
    )


@dataclass(frozen=True)
class Verification:
    """A split's comparisons, their full KVC report and the ROC the report was read from — kept
    so that checkpoint selection reads its metric off the same curve instead of sorting the
    comparisons (millions with ``"all"``) a second time."""

    report: dict[str, Any]
    truth: np.ndarray
    scores: np.ndarray
    curve: Roc


def verify(
    embeddings: torch.Tensor, labels: np.ndarray, protocol: VerificationProtocol, distance: str
) -> Verification:
    """The full KVC report of a split's embeddings under ``protocol``, with its comparisons and curve."""
    scored = protocol.compare(embeddings, labels, distance)
    curve = Roc.of(*validate(scored.truth, scored.scores))
    report = verification_report(scored.truth, scored.scores, subjects=scored.subjects, curve=curve)
    return Verification(report, scored.truth, scored.scores, curve)
