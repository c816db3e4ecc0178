"""Raw corpora as lists of subjects: KVC-onGoing, Aalto desktop, Aalto mobile and synthetic.

A :class:`Source` is opened once in the sharding process (``open``: the candidate subject
ids, unique, in a stable order, plus what was rejected while listing them) and then asked
for one subject at a time (``load``), possibly from forked worker processes. Source specs:

==========================================  ===============================================
``kvc:DIR[:SCENARIO]``                      ``{scenario}_dev_set.npy`` in DIR or DIR/SCENARIO
``aalto-desktop:DIR``                       every ``*_keystrokes.txt`` under DIR (only the
                                            listed ones with ``participants=FILE``)
``aalto-mobile:DIR``                        DIR/keystrokes.csv joined to DIR/test_sections.csv
``synth:N[:SEED[:DIFFICULTY[:SCENARIO]]]``  N synthetic subjects generated in memory; the
                                            same subjects as the dev set of
                                            ``eerpipe synth --subjects N --seed SEED ...``
==========================================  ===============================================
"""

from __future__ import annotations

import csv
import hashlib
import stat
from abc import ABC, abstractmethod
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np

from sharding.kvc import find_files, read_dev_set
from sharding.synth import SCENARIOS, SynthCorpus
from sharding.validate import Rejected, dedupe

SPEC_HELP = ("kvc:DIR[:SCENARIO] | aalto-desktop:DIR | aalto-mobile:DIR | "
             "synth:N[:SEED[:DIFFICULTY[:SCENARIO]]]")
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


ParticipantLists = str | Path | Sequence[str | Path] | None  # one list file, or several


class SourceError(ValueError):
    """A source as a whole cannot be read (missing folder, unreadable required file)."""


class Source(ABC):
    """A corpus as subjects; see the module docstring for the protocol."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What was sharded, for the manifest (paths and parameters, never credentials)."""

    @abstractmethod
    def open(self) -> tuple[list[str], Counter]:
        """Candidate subject ids (unique, stable order) and the rejections found listing them."""

    @abstractmethod
    def load(self, subject_id: str) -> Any:
        """The raw ``{session id: [n_keys, 3]}`` of one subject; raises :class:`Rejected`."""

    def load_counted(self, subject_id: str) -> tuple[Any, Counter]:
        """:meth:`load`, and the sessions it dropped because their raw rows do not parse
        (reason → count); only sources that parse text per subject drop any here."""
        return self.load(subject_id), Counter()


class KVCSource(Source):
    """The dev set of KVC-onGoing (the only part with subject labels)."""

    def __init__(self, root: str | Path, scenario: str | None = None) -> None:
        self.scenario, files = find_files(root, scenario)
        self.path = files["dev_set"].resolve()
        self._users: dict[str, Any] = {}

    def describe(self) -> dict[str, Any]:
        return {"kind": "kvc", "path": str(self.path), "scenario": self.scenario}

    def open(self) -> tuple[list[str], Counter]:
        pairs = read_dev_set(self.path)
        keep, duplicates = dedupe([user for user, _ in pairs])
        self._users = dict(pairs[i] for i in keep)
        return list(self._users), Counter({"subject:duplicate_id": duplicates} if duplicates else {})

    def load(self, subject_id: str) -> Any:
        return self._users[subject_id]


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
        paths = _participant_paths(participants)
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
            lists = [_list_identity(path, ids) for path, ids in self.participant_lists]
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


def _participant_paths(participants: ParticipantLists) -> list[Path]:
    if participants is None:
        return []
    if isinstance(participants, (str, Path)):
        return [Path(participants)]
    return [Path(p) for p in participants]


def _list_identity(path: Path, ids: list[str]) -> dict[str, Any]:
    """A list's path, size and a digest of its ids (not of its bytes: comments may change)."""
    listed = "\n".join(sorted(ids)).encode("utf-8")
    return {"file": str(path), "count": len(ids), "sha256": hashlib.sha256(listed).hexdigest()}


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


class SynthSource(Source):
    """``n`` synthetic subjects, generated on demand (so workers generate in parallel)."""

    def __init__(self, subjects: int, seed: int = 0, difficulty: float = 1.0,
                 scenario: str = "desktop") -> None:
        if subjects < 1:
            raise SourceError("synth: the number of subjects must be at least 1")
        self.subjects = subjects
        self.corpus = SynthCorpus(scenario, seed, difficulty)
        self._index: dict[str, int] = {}

    def describe(self) -> dict[str, Any]:
        c = self.corpus
        return {"kind": "synth", "subjects": self.subjects, "seed": c.seed,
                "difficulty": c.difficulty, "scenario": c.scenario}

    def open(self) -> tuple[list[str], Counter]:
        self._index = {self.corpus.subject_id(i): i for i in range(self.subjects)}
        return list(self._index), Counter()

    def load(self, subject_id: str) -> dict[str, np.ndarray]:
        return self.corpus.subject(self._index[subject_id])


def parse_source(spec: str, participants: ParticipantLists = None) -> Source:
    """Build the :class:`Source` named by a spec (see the module docstring).

    ``participants`` (one participant list file or several) applies to ``aalto-desktop``
    sources only.
    """
    kind, _, rest = spec.partition(":")
    if not rest:
        raise SourceError(f"bad source {spec!r}; expected {SPEC_HELP}")
    if participants is not None and kind != "aalto-desktop":
        raise SourceError(f"--participants applies to aalto-desktop sources only, not {kind!r}")
    if kind == "kvc":
        root, _, scenario = rest.rpartition(":")
        if scenario in SCENARIOS and root:
            return KVCSource(root, scenario)
        return KVCSource(rest)
    if kind == "aalto-desktop":
        return AaltoDesktopSource(rest, participants)
    if kind == "aalto-mobile":
        return AaltoMobileSource(rest)
    if kind == "synth":
        return _synth(spec, rest)
    raise SourceError(f"unknown source kind {kind!r}; expected {SPEC_HELP}")


def _synth(spec: str, rest: str) -> SynthSource:
    parts = rest.split(":")
    try:
        if len(parts) > 4:
            raise ValueError("too many fields")
        subjects = int(parts[0])
        seed = int(parts[1]) if len(parts) > 1 else 0
        difficulty = float(parts[2]) if len(parts) > 2 else 1.0
        scenario = parts[3] if len(parts) > 3 else "desktop"
        return SynthSource(subjects, seed, difficulty, scenario)
    except ValueError as error:
        raise SourceError(f"bad source {spec!r} ({error}); expected "
                          "synth:N[:SEED[:DIFFICULTY[:SCENARIO]]]") from error


def source_arguments(description: dict[str, Any]) -> list[str] | None:
    """The ``eerpipe shard`` arguments that rebuild the source a manifest describes.

    ``None`` for a description no spec produces (a hand-made set, a Python-only source).
    """
    kind, path = description.get("kind"), description.get("path")
    if kind == "kvc" and path:
        spec = f"kvc:{Path(path).parent}:{description.get('scenario')}"
    elif kind in ("aalto-desktop", "aalto-mobile") and path:
        spec = f"{kind}:{path}"
    elif kind == "synth":
        spec = "synth:{subjects}:{seed}:{difficulty}:{scenario}".format(**description)
    else:
        return None
    participants = description.get("participants") or []
    lists = [participants] if isinstance(participants, dict) else participants
    return ["--source", spec, *(arg for entry in lists for arg in ("--participants", entry["file"]))]
