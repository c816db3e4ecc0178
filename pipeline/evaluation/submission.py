"""KVC-onGoing submissions: the test set's files in, ``{scenario}_predictions.txt`` + zip out."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import write_atomic
from sharding.kvc import KVCFileError, read_comparisons, read_test_sessions


def kvc_test_files(root: str | Path, scenario: str) -> tuple[Path, Path]:
    """``({scenario}_test_sessions.npy, comparisons file)`` in ``root`` or ``root/scenario``.

    Unlike :func:`sharding.kvc.find_files` the dev set need not be there: predicting needs only
    the test files.
    """
    root = Path(root)
    for folder in (root / scenario, root):
        sessions = folder / f"{scenario}_test_sessions.npy"
        if sessions.is_file():
            for name in (f"{scenario}_comparisons.txt", f"{scenario}_comparison_list.txt"):
                if (folder / name).is_file():
                    return sessions, folder / name
            raise KVCFileError(f"{folder}: no {scenario}_comparisons.txt or {scenario}_comparison_list.txt")
    raise KVCFileError(f"{root}: no {scenario}_test_sessions.npy here or in a {scenario} subfolder")


def read_test_set(root: str | Path, scenario: str) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """The test sessions (id → ``[n_keys, 3]``) and the comparisons to score, checked: at least
    one comparison (an empty submission is worth nothing), every session numeric, every compared
    session present. The comparisons are read first: they are the smaller file."""
    sessions_path, comparisons_path = kvc_test_files(root, scenario)
    pairs = read_comparisons(comparisons_path)
    if not pairs:
        raise KVCFileError(f"{comparisons_path}: no comparisons to score")
    sessions = read_test_sessions(sessions_path)
    malformed = [s for s, keys in sessions.items() if not _is_session(keys)]
    if not sessions or malformed:
        problem = f"session {malformed[0]!r} is not a numeric [n_keys, 3] array" if malformed else "no sessions"
        raise KVCFileError(f"{sessions_path}: {problem}")
    missing = next((s for pair in pairs for s in pair if s not in sessions), None)
    if missing is not None:
        raise KVCFileError(f"{comparisons_path}: compares session {missing!r}, absent from {sessions_path.name}")
    return sessions, pairs


def _is_session(keys: Any) -> bool:
    return (
        isinstance(keys, np.ndarray) and keys.ndim == 2 and keys.shape[1] == 3
        and (np.issubdtype(keys.dtype, np.number) or keys.size == 0)
    )


def write_predictions(out_dir: str | Path, scenario: str, scores: np.ndarray) -> Path:
    """``{scenario}_predictions.txt`` (one line, ``str(list_of_scores)``) and its zip, for upload.

    Each file is replaced whole, so an earlier submission is never left half-overwritten.
    """
    import fsspec

    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("the model produced non-finite scores (NaN or inf); no predictions written")
    text = Path(out_dir).resolve() / f"{scenario}_predictions.txt"
    line = str(scores.tolist()).encode()  # repr of each float: parses back to the same value
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr(text.name, line)
    local = fsspec.filesystem("file")
    write_atomic(local, str(text), line)
    write_atomic(local, str(text.with_suffix(".zip")), archive.getvalue())
    return text
