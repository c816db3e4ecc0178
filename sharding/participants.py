"""Participant lists: the files that name a benchmark's participants, one id per line.

A benchmark is rebuilt from a public download by listing its participants; several lists (one per
public source) combine into one benchmark whose parts are reported separately, so lists must not
overlap.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sharding.sources import SourceError

ParticipantLists = str | Path | Sequence[str | Path] | None  # one list file, or several


def read_participants(path: str | Path) -> list[str]:
    """Participant ids listed one per line (``#`` starts a comment, blank lines are skipped).

    A repeated id or a line holding more than one word is refused: either is a sign the
    file is not the list the user meant.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SourceError(f"{path}: cannot read the participant list "
                          f"({error.strerror or error})") from error
    except UnicodeDecodeError as error:
        raise SourceError(f"{path}: the participant list is not UTF-8 text") from error
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if len(words) > 1:
            raise SourceError(f"{path}:{number}: expected one participant id per line, "
                              f"found {len(words)} words")
        if words and words[0] in lines:
            raise SourceError(f"{path}:{number}: participant {words[0]!r} is already listed "
                              f"on line {lines[words[0]]}")
        if words:
            lines[words[0]] = number
    if not lines:
        raise SourceError(f"{path}: the participant list names no participant")
    return list(lines)


def read_participant_lists(paths: Sequence[Path]) -> list[list[str]]:
    """The ids of each list (see :func:`read_participants`), in order.

    A participant named by two lists is refused: combined lists are a benchmark's parts (one
    per public source), which are reported separately and so must not overlap.
    """
    lists: list[list[str]] = []
    owner: dict[str, Path] = {}
    for path in paths:
        ids = read_participants(path)
        twice = next((p for p in ids if p in owner), None)
        if twice is not None:
            raise SourceError(f"{path}: participant {twice!r} is already listed in {owner[twice]}")
        owner.update(dict.fromkeys(ids, path))
        lists.append(ids)
    return lists


def participant_paths(participants: ParticipantLists) -> list[Path]:
    if participants is None:
        return []
    if isinstance(participants, (str, Path)):
        return [Path(participants)]
    return [Path(p) for p in participants]


def list_identity(path: Path, ids: list[str]) -> dict[str, Any]:
    """A list's path, size and a digest of its ids (not of its bytes: comments may change)."""
    listed = "\n".join(sorted(ids)).encode("utf-8")
    return {"file": str(path), "count": len(ids), "sha256": hashlib.sha256(listed).hexdigest()}
