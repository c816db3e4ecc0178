"""What counts as a usable session and subject; every drop is counted under a named reason.

Reason keys (the ``rejected`` counters of the manifest) say what was dropped:
``session:*`` one session, ``subject:*`` one subject, ``file:*`` one input file, ``row:*``
one input row that could not be attributed to any session.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from sharding.format import sample_key

MIN_SESSIONS = 2

REASONS = {
    "session:bad_shape": "not a numeric [n_keys, 3] array",
    "session:empty": "no keystrokes",
    "session:non_finite_time": "a NaN or infinite time or keycode",
    "session:negative_time": "a press or release time below 0",
    "session:release_before_press": "a key released before it was pressed",
    "session:keycode_out_of_range": "a keycode outside the integers 0-255",
    "session:duplicate_id": "a session id already used by this subject (once made a string)",
    "session:malformed_rows": "an Aalto row of this session did not parse (the session is dropped, the file kept)",
    "session:unknown_test_section": "Aalto mobile keystrokes whose test section has no participant",
    "subject:too_few_sessions": f"fewer than {MIN_SESSIONS} valid sessions left",
    "subject:duplicate_id": "the id was already taken by an earlier subject (the first is kept)",
    "subject:not_a_session_dict": "the user's entry is not a dict of sessions",
    "file:malformed": "an Aalto file that cannot be read as one participant's (skipped whole)",
    "row:malformed": "an Aalto row whose test section id does not parse",
}


class Rejected(Exception):
    """A whole subject (or its file) is unusable; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# Row checks in priority order: a session is rejected for the first one any of its rows fails.
_ROW_CHECKS = (
    ("session:non_finite_time", lambda t: ~np.isfinite(t).all(axis=1)),
    ("session:negative_time", lambda t: (t[:, 0] < 0) | (t[:, 1] < 0)),
    ("session:release_before_press", lambda t: t[:, 1] < t[:, 0]),
    ("session:keycode_out_of_range",
     lambda t: (t[:, 2] < 0) | (t[:, 2] > 255) | (t[:, 2] != np.round(t[:, 2]))),
)


def _as_table(session: Any) -> tuple[str | None, np.ndarray | None]:
    try:
        array = np.asarray(session, dtype=np.float64)
    except (TypeError, ValueError):
        return "session:bad_shape", None
    if array.size == 0:
        return "session:empty", None
    if array.ndim != 2 or array.shape[1] != 3:
        return "session:bad_shape", None
    return None, array


def clean_subject(sessions: Any) -> tuple[dict[str, np.ndarray], Counter]:
    """The usable sessions of one subject (ids as strings, ``float64 [n_keys, 3]``) and the
    count of dropped ones by reason.

    Raises :class:`Rejected` if the entry is not a dict; the caller decides what too few
    remaining sessions mean (see :data:`MIN_SESSIONS`). Checks run on all of the subject's
    rows at once: a subject has ~15 sessions, and per-session numpy calls would dominate.
    """
    if not isinstance(sessions, Mapping):
        raise Rejected("subject:not_a_session_dict", type(sessions).__name__)
    dropped: Counter = Counter()
    ids: list[str] = []
    tables: list[np.ndarray] = []
    for session_id, session in sessions.items():
        reason, table = _as_table(session)
        if reason is None and str(session_id) in ids:
            reason = "session:duplicate_id"
        if reason is None:
            assert table is not None  # _as_table gives a table or a reason
            ids.append(str(session_id))
            tables.append(table)
        else:
            dropped[reason] += 1
    if not tables:
        return {}, dropped
    rows = np.concatenate(tables)
    starts = np.cumsum([0] + [len(t) for t in tables[:-1]])
    failed = np.zeros(len(tables), dtype=bool)
    with np.errstate(invalid="ignore"):
        for reason, check in _ROW_CHECKS:
            hits = np.logical_or.reduceat(check(rows), starts) & ~failed
            dropped[reason] += int(hits.sum())
            failed |= hits
    return {i: t for i, t, bad in zip(ids, tables, failed) if not bad}, +dropped


def dedupe(ids: list[str]) -> tuple[list[int], int]:
    """Positions of the first occurrence of each id, and how many later duplicates there were.

    Ids are compared by their WebDataset sample key too: two ids that only differ in ``.``
    versus ``_`` would collide inside a shard.
    """
    seen: set[str] = set()
    keep = []
    for i, subject_id in enumerate(ids):
        key = sample_key(subject_id)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep, len(ids) - len(keep)
