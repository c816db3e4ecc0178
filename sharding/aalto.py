"""The public Aalto keystroke corpora: desktop (one text file per participant) and mobile
(typing37k, two CSV tables joined by test section).

Both parse text, so both decide what a malformed row costs: its session
(``session:malformed_rows``), never the participant. The desktop reader opens only regular files
of a bounded size, because a folder of downloads is untrusted input.
"""

from __future__ import annotations

import csv
import stat
from array import array
from collections import Counter
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np

from sharding.participants import ParticipantLists, list_identity, participant_paths, read_participant_lists
from sharding.sources import Source, SourceError
from sharding.validate import Rejected, dedupe

DESKTOP_COLUMNS = ("PARTICIPANT_ID", "TEST_SECTION_ID", "SENTENCE", "USER_INPUT", "KEYSTROKE_ID",
                   "PRESS_TIME", "RELEASE_TIME", "LETTER", "KEYCODE")
MOBILE_KEYSTROKE_COLUMNS = ("KEYSTROKE_ID", "PRESS_TIME", "RELEASE_TIME", "LETTER",
                            "TEST_SECTION_ID", "KEYCODE", "IKI")
MOBILE_SECTION_COLUMNS = ("TEST_SECTION_ID", "SENTENCE_ID", "PARTICIPANT_ID", "USER_INPUT")
_TIME_COLUMNS = ("PRESS_TIME", "RELEASE_TIME", "KEYCODE")
# The public desktop files average ~100 KB (16 GiB over 168,000 files): 15 sentences of a few
# dozen keystrokes, ~150 bytes a row. 32 MiB leaves room for a participant 300 times as
# prolific, and bounds what one worker holds in memory for one file.
MAX_PARTICIPANT_FILE_BYTES = 32 * 2**20
_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISDIR, "a folder"))



class AaltoDesktopSource(Source):
    """One ``<PARTICIPANT_ID>_keystrokes.txt`` per participant; malformed files are skipped,
    and a malformed row drops only its session (see :func:`read_desktop_file`).

    ``participants`` (a file, see :func:`read_participants`, or several, see
    :func:`read_participant_lists`) restricts the source to the listed participants, so that a
    benchmark subset can be rebuilt from the public downloads; a listed participant without a
    file is an error. Every file to read must be a regular file (or a symlink to one, wherever
    it points) of at most :data:`MAX_PARTICIPANT_FILE_BYTES`: a named pipe would block the
    reader forever and a link to ``/dev/zero`` would fill its memory, so either stops the job
    in ``open``, naming it.
    """

    SUFFIX = "_keystrokes.txt"

    def __init__(self, root: str | Path, participants: ParticipantLists = None) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise SourceError(f"aalto-desktop: {self.root} is not a folder")
        paths = participant_paths(participants)
        self.participant_lists = [(path.resolve(), ids) for path, ids
                                  in zip(paths, read_participant_lists(paths))]
        self.participants = ([p for _, ids in self.participant_lists for p in ids]
                             if paths else None)
        self._files: dict[str, Path] = {}

    def describe(self) -> dict[str, Any]:
        """One participant list is recorded as one entry, as before lists could be combined, so
        the sets sharded with one keep their identity (re-running their command repairs them)."""
        description: dict[str, Any] = {"kind": "aalto-desktop", "path": str(self.root)}
        if self.participant_lists:
            lists = [list_identity(path, ids) for path, ids in self.participant_lists]
            description["participants"] = lists[0] if len(lists) == 1 else lists
        return description

    def open(self) -> tuple[list[str], Counter]:
        files = sorted(self.root.rglob(f"*{self.SUFFIX}"))
        if not files:
            raise SourceError(f"aalto-desktop: no *{self.SUFFIX} files under {self.root}")
        ids = [f.name[: -len(self.SUFFIX)] for f in files]
        if self.participants is not None:
            files, ids = self._listed(files, ids)
        for path in files:
            _check_participant_file(path)
        keep, duplicates = dedupe(ids)
        self._files = {ids[i]: files[i] for i in keep}
        return list(self._files), Counter({"subject:duplicate_id": duplicates} if duplicates else {})

    def load(self, subject_id: str) -> dict[str, np.ndarray]:
        return self.load_counted(subject_id)[0]

    def load_counted(self, subject_id: str) -> tuple[dict[str, np.ndarray], Counter]:
        return read_desktop_file(self._files[subject_id], subject_id)

    def _listed(self, files: list[Path], ids: list[str]) -> tuple[list[Path], list[str]]:
        """The files of the listed participants; refuses a listed participant without one."""
        assert self.participants is not None
        listed, present = set(self.participants), set(ids)
        missing = [p for p in self.participants if p not in present]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            listing = next(path for path, ids in self.participant_lists if missing[0] in ids)
            raise SourceError(f"{listing}: participant {missing[0]!r} has no "
                              f"{missing[0]}{self.SUFFIX} under {self.root}{more}")
        chosen = [i for i, subject in enumerate(ids) if subject in listed]
        return [files[i] for i in chosen], [ids[i] for i in chosen]


def _check_participant_file(path: Path) -> None:
    """Refuse, naming it, a file the reader must not open: one that is not a regular file (a
    symlink is followed) or is larger than :data:`MAX_PARTICIPANT_FILE_BYTES`."""
    try:
        status = path.stat()
    except OSError as error:  # a dangling symlink, a file that vanished
        raise SourceError(f"aalto-desktop: {path}: cannot read "
                          f"({error.strerror or error})") from error
    if not stat.S_ISREG(status.st_mode):
        kind = next((name for is_kind, name in _FILE_KINDS if is_kind(status.st_mode)), "a file")
        problem = (f"{kind}, not a regular file (only regular files, or symlinks to them, are "
                   "read)")
    elif status.st_size > MAX_PARTICIPANT_FILE_BYTES:
        problem = (f"{status.st_size:,} bytes, more than the {MAX_PARTICIPANT_FILE_BYTES:,} an "
                   "Aalto participant file may hold")
    else:
        return
    raise SourceError(f"aalto-desktop: {path} is {problem}; remove it, or leave its participant "
                      "out with --participants")


def read_desktop_file(path: Path, participant: str) -> tuple[dict[str, np.ndarray], Counter]:
    """Sessions (by TEST_SECTION_ID, in file order) of one Aalto desktop file, and what was
    dropped while parsing it (reason → count).

    A row that does not parse (another field count than the header's, e.g. a field holding a
    tab or a line break; a time or keycode that is not a number) drops its session,
    ``session:malformed_rows``, and nothing else: rejecting the file would lose the
    participant's other sentences. Raises ``Rejected("file:malformed")`` if the file cannot
    be read, its header lacks a needed column, or a row names another participant.

    Rows end at a line feed only (a carriage return before it is dropped): in the few files
    with CRLF line ends, the Enter key's LETTER is a lone carriage return, a field, which
    universal newlines would take for a row end, dropping a good sentence.
    """
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as error:
        raise Rejected("file:malformed", f"{path}: {error}") from error
    lines = [line.rstrip("\r") for line in text.split("\n")]
    header = [name.strip().upper() for name in lines[0].split("\t")]
    missing = [c for c in ("PARTICIPANT_ID", "TEST_SECTION_ID", *_TIME_COLUMNS) if c not in header]
    if missing:
        raise Rejected("file:malformed", f"{path}: header lacks {', '.join(missing)}")
    sections, table, dropped = _desktop_rows(path, lines, header, participant)
    if not sections:
        return {}, dropped
    return {str(section): block for section, block in _group(np.array(sections), table)}, dropped


def _desktop_rows(path: Path, lines: list[str], header: list[str],
                  participant: str) -> tuple[list[str], np.ndarray, Counter]:
    """Each good row's section and ``[press, release, keycode]``, without the sessions that
    hold a row that does not parse, and the count of what was dropped.

    Whole columns are converted at once, as long as the rows allow: a file is ~1,000 rows, and
    a row at a time would slow the common, clean file by a third.
    """
    width = len(header)
    split = [line.split("\t") for line in lines[1:] if line]
    rows = [fields for fields in split if len(fields) == width]
    columns = list(zip(*rows)) if rows else [()] * width
    others = {name.strip() for name in columns[header.index("PARTICIPANT_ID")]} - {participant}
    if others:
        raise Rejected("file:malformed", f"{path}: PARTICIPANT_ID {min(others)!r} differs from "
                                         "the file name")
    sections = [name.strip() for name in columns[header.index("TEST_SECTION_ID")]]
    table, not_numbers = _numbers([columns[header.index(c)] for c in _TIME_COLUMNS])
    bad, orphans = (_cut_sections(split, header, participant) if len(rows) < len(split)
                    else (set(), 0))
    bad.update(sections[i] for i in not_numbers)
    kept = [i for i, name in enumerate(sections) if name not in bad]
    dropped = Counter({"session:malformed_rows": len(bad), "row:malformed": orphans})
    return [sections[i] for i in kept], table[kept], +dropped


def _cut_sections(split: list[list[str]], header: list[str],
                  participant: str) -> tuple[set[str], int]:
    """The sections holding a row of another field count than the header's, and how many such
    rows belong to no section.

    A bad row belongs to the section it names when it starts with the participant's id;
    otherwise it is the rest of the row above it, cut by a line break inside a field.
    """
    owner, named = header.index("PARTICIPANT_ID"), header.index("TEST_SECTION_ID")
    bad, orphans, section = set(), 0, None
    for fields in split:
        if len(fields) > max(owner, named) and fields[owner].strip() == participant:
            section = fields[named].strip()
        if len(fields) == len(header):
            continue
        if section is None:
            orphans += 1
        else:
            bad.add(section)
    return bad, orphans


def _numbers(columns: list[tuple[str, ...]]) -> tuple[np.ndarray, list[int]]:
    """The text ``columns`` as ``float64 [rows, columns]`` (NaN where a field is not a number),
    and the rows holding such a field."""
    try:
        return np.array(columns, dtype=np.float64).T, []
    except ValueError:
        rows = [_floats(values) for values in zip(*columns)]
        table = np.array([row or [np.nan] * len(columns) for row in rows], dtype=np.float64)
        return table, [i for i, row in enumerate(rows) if row is None]


def _floats(values: tuple[str, ...]) -> list[float] | None:
    try:
        return [float(value) for value in values]
    except ValueError:
        return None


def _group(keys: np.ndarray, table: np.ndarray) -> list[tuple[Any, np.ndarray]]:
    """``(key, rows)`` per distinct key, keys in order of first appearance, rows in file order."""
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(unique)))[:-1]
    blocks = np.split(table[order], bounds)
    return [(unique[i], blocks[i]) for i in np.argsort(first)]


class AaltoMobileSource(Source):
    """typing37k: ``keystrokes.csv`` joined to ``test_sections.csv``; header rows are detected.

    Both files are read whole in ``open`` (the join needs them). A row that does not parse
    drops its session (``session:malformed_rows``), or is counted alone (``row:malformed``)
    when even its test section id is unreadable; nothing else is lost.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        for name in ("keystrokes.csv", "test_sections.csv"):
            if not (self.root / name).is_file():
                raise SourceError(f"aalto-mobile: {self.root / name} does not exist")
        self._subjects: dict[str, dict[str, np.ndarray]] = {}

    def describe(self) -> dict[str, Any]:
        return {"kind": "aalto-mobile", "path": str(self.root)}

    def open(self) -> tuple[list[str], Counter]:
        rejected: Counter = Counter()
        owner = self._section_owners(rejected)
        sessions = self._sessions(rejected)
        for section, table in sessions.items():
            participant = owner.get(section)
            if participant is None:
                rejected["session:unknown_test_section"] += 1
            else:
                self._subjects.setdefault(participant, {})[section] = table
        return sorted(self._subjects), rejected

    def load(self, subject_id: str) -> Any:
        return self._subjects[subject_id]

    def _section_owners(self, rejected: Counter) -> dict[str, str]:
        path = self.root / "test_sections.csv"
        owner: dict[str, str] = {}
        with _open_text(path) as stream:
            rows, index = _table(stream, path, MOBILE_SECTION_COLUMNS,
                                 ("TEST_SECTION_ID", "PARTICIPANT_ID"))
            need = max(index.values())
            for row in rows:
                if len(row) <= need or not row[index["TEST_SECTION_ID"]].strip():
                    rejected["row:malformed"] += 1
                    continue
                owner[row[index["TEST_SECTION_ID"]].strip()] = row[index["PARTICIPANT_ID"]].strip()
        return owner

    def _sessions(self, rejected: Counter) -> dict[str, np.ndarray]:
        path = self.root / "keystrokes.csv"
        section_of: dict[str, int] = {}
        bad: set[int] = set()
        sections, values = array("q"), array("d")
        with _open_text(path) as stream:
            rows, index = _table(stream, path, MOBILE_KEYSTROKE_COLUMNS,
                                 ("TEST_SECTION_ID", *_TIME_COLUMNS))
            section_column = index["TEST_SECTION_ID"]
            value_columns = [index[c] for c in _TIME_COLUMNS]
            need = max(index.values())
            for row in rows:
                name = row[section_column].strip() if len(row) > section_column else ""
                if not name:
                    rejected["row:malformed"] += 1
                    continue
                section = section_of.setdefault(name, len(section_of))
                try:
                    if len(row) <= need:
                        raise ValueError("too few fields")
                    numbers = [float(row[c]) for c in value_columns]
                except ValueError:
                    bad.add(section)
                    continue
                sections.append(section)
                values.extend(numbers)
        rejected["session:malformed_rows"] += len(bad)
        names = list(section_of)
        table = np.frombuffer(values, dtype=np.float64).reshape(-1, 3)
        grouped = _group(np.frombuffer(sections, dtype=np.int64), table) if len(table) else []
        return {names[i]: block for i, block in grouped if i not in bad}


def _open_text(path: Path) -> TextIO:
    try:
        return open(path, newline="", encoding="utf-8", errors="replace")
    except OSError as error:
        raise SourceError(f"{path}: cannot read ({error.strerror or error})") from error


def _table(stream: TextIO, path: Path, documented: tuple[str, ...], needed: tuple[str, ...]):
    """CSV rows and the column index of each needed name; detects delimiter and header.

    A first row naming the needed columns is a header; otherwise the file is taken to be in
    the documented column order, which its first row must then fit.
    """
    first = stream.readline()
    delimiter = "\t" if "\t" in first else ","
    quoting: Literal[0, 1, 2, 3] = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    head = next(csv.reader([first], delimiter=delimiter, quoting=quoting), [])
    names = [field.strip().strip('"').upper() for field in head]
    rows = csv.reader(stream, delimiter=delimiter, quoting=quoting)
    if all(name in names for name in needed):
        return rows, {name: names.index(name) for name in needed}
    if any(name in names for name in documented):
        missing = [name for name in needed if name not in names]
        raise SourceError(f"{path}: the header lacks {', '.join(missing)}")
    index = {name: documented.index(name) for name in needed}
    if len(head) < len(documented) - 1 or not _numeric(head, index, needed):
        raise SourceError(f"{path}: no header and the first row does not fit the documented "
                          f"columns {', '.join(documented)}")
    return _chain([head], rows), index


def _numeric(row: list[str], index: dict[str, int], needed: tuple[str, ...]) -> bool:
    try:
        for name in needed:
            if name in _TIME_COLUMNS:
                float(row[index[name]])
    except (ValueError, IndexError):
        return False
    return True


def _chain(first: list[list[str]], rest):
    yield from first
    yield from rest
