"""A synthetic keystroke corpus written in the exact KVC-onGoing file format.

The real corpora sit behind registration forms, so tests and the demo run on this one. It
is built to be *hard in the way KVC is hard*: subjects come from a few shared typing styles
plus individual deviations (low inter-class variability), and every session drifts and
carries keystroke noise (high intra-class variability). Per subject:

* a typing rhythm: log-normal hold time per key, press-to-press ("flight") times that
  depend on the digraph through keyboard geometry (distance, same finger, same hand) plus
  the subject's own per-digraph habits, an overall speed, a pause and a typo rate;
* 15 sessions, each one sentence (~50 keys) drawn from a pool made by a small English-like
  text generator (like Aalto, many subjects type the same sentences); capitals are typed
  with Shift held across the letter, typos with a neighbouring key and Backspace;
* times are integer Unix-epoch milliseconds with release >= press; keycodes are JavaScript
  key codes (on ``mobile`` some subjects' virtual keyboards report 229 for every letter).

Everything is a deterministic function of ``(seed, subject index)``, so any worker can
generate any subject on its own; ``difficulty`` scales the intra-class variability (session
drift and keystroke noise). The default, 1.0, is calibrated in ``sharding/README.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

SCENARIOS = ("desktop", "mobile")
SESSIONS_PER_SUBJECT = 15
ENROL_SESSIONS = 5

_EPOCH_MS = 1_470_000_000_000  # mid-2016, when the Aalto corpora were collected
_YEAR_MS = 365 * 24 * 3600 * 1000
_SENTENCES = 2000
_N_STYLES = 6
# Streams of the seeded generator, so that adding one never shifts the others.
_STREAM_WORLD, _STREAM_SUBJECT, _STREAM_EVAL = 0, 1, 2

SHIFT, BACKSPACE, SPACE, VIRTUAL = 16, 8, 32, 229
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part over "
    "new sound take only little work know place year live me back give most very after thing "
    "our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put "
    "end does another well large must big even such because turn here why ask went men read "
    "need land different home us move try kind hand picture again change off play spell air "
    "away animal house point page letter mother answer found study still learn should world"
).split()

# Touch-typing geometry: (x, y) in key widths, hand (0 left, 1 right, 2 thumb), finger id.
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_FINGER = {**dict.fromkeys("qaz", 0), **dict.fromkeys("wsx", 1), **dict.fromkeys("edc", 2),
           **dict.fromkeys("rfvtgb", 3), **dict.fromkeys("yhnujm", 4), **dict.fromkeys("ik,", 5),
           **dict.fromkeys("ol.", 6), **dict.fromkeys("p'", 7)}
_CHAR_CODE = {**{c: ord(c.upper()) for c in "abcdefghijklmnopqrstuvwxyz"},
              " ": SPACE, ".": 190, ",": 188, "'": 222}


def _layout() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Key codes used by the generator and their position, hand and finger."""
    keys: list[tuple[int, float, float, int]] = []  # code, x, y, finger
    for row, (letters, offset) in enumerate(zip(_ROWS, (0.0, 0.25, 0.75))):
        keys += [(ord(c.upper()), offset + i, float(row), _FINGER[c]) for i, c in enumerate(letters)]
    keys += [(188, 7.75, 2.0, 5), (190, 8.75, 2.0, 6), (222, 10.25, 1.0, 7),
             (SPACE, 4.5, 3.0, 8), (SHIFT, -1.5, 2.0, 0), (BACKSPACE, 12.5, -1.0, 7)]
    codes = np.array([k[0] for k in keys])
    xy = np.array([(k[1], k[2]) for k in keys])
    finger = np.array([k[3] for k in keys])
    hand = np.where(finger == 8, 2, finger // 4)
    return codes, xy, hand, finger


_CODES, _XY, _HAND, _FINGERS = _layout()
_N_KEYS = len(_CODES)
_INDEX = np.zeros(256, dtype=np.int64)
_INDEX[_CODES] = np.arange(_N_KEYS)
_IS_LETTER = np.zeros(256, dtype=bool)
_IS_LETTER[65:91] = True


def _neighbours() -> np.ndarray:
    """For each letter key code, the four nearest other letters (the usual typo targets)."""
    letters = np.arange(65, 91)
    xy = _XY[_INDEX[letters]]
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    table = np.zeros((256, 4), dtype=np.int64)
    table[letters] = letters[np.argsort(dist, axis=1)[:, :4]]
    return table


_NEIGHBOURS = _neighbours()
_DIST = np.linalg.norm(_XY[:, None] - _XY[None], axis=-1)
_SAME_HAND = (_HAND[:, None] == _HAND[None]) & (_HAND[:, None] < 2)
_SAME_FINGER = (_FINGERS[:, None] == _FINGERS[None]) & ~np.eye(_N_KEYS, dtype=bool)
_REPEAT = np.eye(_N_KEYS, dtype=bool)
_TOUCHES_SPACE = (_CODES[:, None] == SPACE) | (_CODES[None] == SPACE)
_TO_BACKSPACE = np.broadcast_to(_CODES[None] == BACKSPACE, (_N_KEYS, _N_KEYS))


@dataclass(frozen=True)
class _Scenario:
    """Population-level timing constants (log milliseconds) of one device type."""

    hold: float  # typical log hold time
    flight: float  # typical log press-to-press time
    speed_sd: float  # between-subject spread of overall speed
    distance: float  # log-flight per key width travelled
    same_hand: float
    same_finger: float
    virtual_keyboards: float  # fraction of subjects whose keyboard reports 229 for letters


_SCENARIO = {
    "desktop": _Scenario(4.55, 5.25, 0.30, 0.035, 0.10, 0.25, 0.0),
    "mobile": _Scenario(4.35, 5.55, 0.25, 0.060, 0.20, 0.05, 0.3),
}

# Variability, in log milliseconds: between styles, between subjects of a style, and (scaled
# by ``difficulty``) between sessions of a subject and between keystrokes of a session.
_STYLE_SD = 0.15
_SUBJECT_KEY_SD = 0.12  # per-key hold and per-digraph flight habits
_SUBJECT_SD = 0.10  # subject-level offsets of hold and of the geometry coefficients
_SESSION_SD = 0.063
_KEY_NOISE_HOLD = 0.17
_KEY_NOISE_FLIGHT = 0.27


@dataclass(frozen=True)
class SynthCorpus:
    """A deterministic synthetic population; ``subject(i)`` is the i-th subject's sessions."""

    scenario: str = "desktop"
    seed: int = 0
    difficulty: float = 1.0
    sessions_per_subject: int = SESSIONS_PER_SUBJECT

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; expected one of {SCENARIOS}")
        if not self.difficulty > 0:
            raise ValueError(f"difficulty must be > 0, got {self.difficulty}")
        if self.sessions_per_subject < 2:
            raise ValueError("a subject needs at least 2 sessions")

    @cached_property
    def _world(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """The sentence pool and the shared typing styles (hold and flight tables)."""
        rng = np.random.default_rng([self.seed, _STREAM_WORLD])
        return _sentence_pool(rng), *_styles(rng, _SCENARIO[self.scenario])

    def subject_id(self, index: int) -> str:
        """An 8-character id, like KVC's; a bijection of the index, so ids never collide."""
        return format((index * 2654435761 + 12345) % 2**32, "08x")

    def subject(self, index: int) -> dict[str, np.ndarray]:
        """Session id → ``int64 [n_keys, 3]`` of ``[press_ms, release_ms, keycode]``."""
        rng = np.random.default_rng([self.seed, _STREAM_SUBJECT, index])
        sentences, style_hold, style_flight = self._world
        scenario = _SCENARIO[self.scenario]
        style = rng.integers(_N_STYLES)
        # The subject's rhythm: style + individual habits.
        hold_table = (style_hold[style] + _SUBJECT_SD * rng.standard_normal()
                      + _SUBJECT_KEY_SD * rng.standard_normal(_N_KEYS))
        flight_table = (style_flight[style] + scenario.speed_sd * rng.standard_normal()
                        + _SUBJECT_SD * rng.standard_normal() * _DIST / 4
                        + _SUBJECT_KEY_SD * rng.standard_normal((_N_KEYS, _N_KEYS)))
        pause_rate = rng.uniform(0.005, 0.04)
        typo_rate = rng.uniform(0.0, 0.04)
        virtual = rng.random() < scenario.virtual_keyboards

        n_sessions = self.sessions_per_subject
        chosen = rng.integers(len(sentences), size=n_sessions)
        codes = np.concatenate([sentences[i] for i in chosen])
        session = np.repeat(np.arange(n_sessions), [len(sentences[i]) for i in chosen])
        codes, session = _with_typos(codes, session, typo_rate, rng)
        n = len(codes)
        first = np.r_[True, session[1:] != session[:-1]]
        key = _INDEX[codes]
        prev = np.r_[_INDEX[SPACE], key[:-1]]

        # Sessions drift: a random walk of speed and hold across the subject's sessions.
        noise = self.difficulty
        drift_flight = np.cumsum(_SESSION_SD * noise * rng.standard_normal(n_sessions))
        drift_hold = np.cumsum(0.6 * _SESSION_SD * noise * rng.standard_normal(n_sessions))
        log_flight = (flight_table[prev, key] + drift_flight[session]
                      + _KEY_NOISE_FLIGHT * noise * rng.standard_normal(n))
        flight = np.exp(log_flight)
        pauses = rng.random(n) < pause_rate
        flight[pauses] += rng.lognormal(6.4, 0.6, pauses.sum())
        flight[first] = 0.0
        log_hold = (hold_table[key] + drift_hold[session]
                    + _KEY_NOISE_HOLD * noise * rng.standard_normal(n))
        hold = np.exp(log_hold)
        # Shift stays down until after the letter it capitalises has been pressed.
        shifts = np.flatnonzero(codes[:-1] == SHIFT)
        hold[shifts] = flight[shifts + 1] + hold[shifts + 1] * rng.uniform(0.3, 0.9, len(shifts))

        starts = (_EPOCH_MS + rng.integers(_YEAR_MS)
                  + np.cumsum(rng.integers(20_000, 120_000, n_sessions)))
        elapsed = np.cumsum(flight)
        offset = elapsed[first][session]  # elapsed time at each session's first key
        press = np.round(starts[session] + elapsed - offset).astype(np.int64)
        release = press + np.round(hold).astype(np.int64)
        if virtual:
            codes = np.where(_IS_LETTER[codes], VIRTUAL, codes)
        table = np.stack([press, release, codes], axis=1)
        bounds = np.flatnonzero(first)[1:]
        base = index * 100
        return {str(base + k): block for k, block in enumerate(np.split(table, bounds))}

    def dev_set(self, indices: range) -> dict[str, dict[str, np.ndarray]]:
        """KVC ``*_dev_set.npy`` content for the given subject indices."""
        return {self.subject_id(i): self.subject(i) for i in indices}


def _sentence_pool(rng: np.random.Generator) -> list[np.ndarray]:
    """Key-code sequences of English-like sentences: Zipf-weighted words, 35-70 characters."""
    weights = 1.0 / np.arange(1, len(_WORDS) + 1) ** 0.9
    weights /= weights.sum()
    pool = []
    for _ in range(_SENTENCES):
        target = rng.integers(35, 71)
        words = [_WORDS[w] for w in rng.choice(len(_WORDS), size=target // 2, p=weights)]
        lengths = np.cumsum([len(w) + 1 for w in words])
        text = " ".join(words[: np.searchsorted(lengths, target) + 1])
        if rng.random() < 0.7:
            text += "."
        if rng.random() < 0.2:
            text = text.replace(" ", ", ", 1)
        codes = [SHIFT, _CHAR_CODE[text[0]]] + [_CHAR_CODE[c] for c in text[1:]]
        pool.append(np.array(codes, dtype=np.int64))
    return pool


def _styles(rng: np.random.Generator, scenario: _Scenario) -> tuple[np.ndarray, np.ndarray]:
    """Shared typing styles: per-key log hold ``[styles, keys]`` and digraph log flight."""
    hold = (scenario.hold + _STYLE_SD * rng.standard_normal((_N_STYLES, 1))
            + 0.5 * _STYLE_SD * rng.standard_normal((_N_STYLES, _N_KEYS)))
    hold[:, _INDEX[SPACE]] += 0.15  # thumbs press longer
    coefficients = rng.normal(1.0, 0.3, (_N_STYLES, 4))
    flight = (scenario.flight + _STYLE_SD * rng.standard_normal((_N_STYLES, 1, 1))
              + coefficients[:, 0, None, None] * scenario.distance * _DIST
              + coefficients[:, 1, None, None] * scenario.same_hand * _SAME_HAND
              + coefficients[:, 2, None, None] * scenario.same_finger * _SAME_FINGER
              - 0.15 * _REPEAT
              + coefficients[:, 3, None, None] * 0.1 * _TOUCHES_SPACE
              + 0.5 * _TO_BACKSPACE)  # noticing a typo takes a moment
    return hold, flight


def _with_typos(codes: np.ndarray, session: np.ndarray, rate: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Insert ``wrong neighbour, Backspace`` before a fraction ``rate`` of the letters."""
    typo = _IS_LETTER[codes] & (rng.random(len(codes)) < rate)
    repeats = 1 + 2 * typo
    out = np.repeat(codes, repeats)
    first = np.cumsum(repeats)[typo] - 3  # each typo expands to [wrong, backspace, correct]
    out[first] = _NEIGHBOURS[codes[typo], rng.integers(4, size=int(typo.sum()))]
    out[first + 1] = BACKSPACE
    return out, np.repeat(session, repeats)


@dataclass(frozen=True)
class KVCFiles:
    """Paths of one scenario's files in the KVC layout (``<root>/<scenario>/...``)."""

    dev_set: Path
    test_sessions: Path
    comparisons: Path
    ground_truth: Path


def kvc_paths(root: str | Path, scenario: str) -> KVCFiles:
    folder = Path(root) / scenario
    return KVCFiles(
        folder / f"{scenario}_dev_set.npy",
        folder / f"{scenario}_test_sessions.npy",
        folder / f"{scenario}_comparisons.txt",
        folder / f"{scenario}_ground_truth.json",
    )


def evaluation_set(corpus: SynthCorpus, indices: range, enrol_sessions: int = ENROL_SESSIONS,
                   ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]], list[int], dict[str, str]]:
    """KVC-style evaluation data for held-out subjects.

    Each subject's first ``enrol_sessions`` sessions are enrolment, the rest verification.
    Genuine comparisons pair every enrolment session with every own verification session;
    as many impostor comparisons pair the subject's enrolment sessions with verification
    sessions of other evaluation subjects. Session ids are anonymised (shuffled, opaque).

    Returns ``(test_sessions, comparisons, labels, session → subject id)``.
    """
    if len(indices) < 2:
        raise ValueError("the evaluation set needs at least 2 subjects (impostors come from others)")
    if not 0 < enrol_sessions < corpus.sessions_per_subject:
        raise ValueError(f"enrol_sessions must be in 1..{corpus.sessions_per_subject - 1}")
    rng = np.random.default_rng([corpus.seed, _STREAM_EVAL])
    owners, arrays, enrol = [], [], []
    for i in indices:
        subject = corpus.subject(i)
        assert len(subject) == corpus.sessions_per_subject  # every synthetic subject has them all
        for k, array in enumerate(subject.values()):
            owners.append(corpus.subject_id(i))
            arrays.append(array)
            enrol.append(k < enrol_sessions)
    order = rng.permutation(len(arrays))
    names = [f"{j:08d}" for j in range(len(arrays))]
    name_of = {int(original): names[j] for j, original in enumerate(order)}
    sessions = {name_of[j]: arrays[j] for j in order}
    subject_of = {name_of[j]: owners[j] for j in range(len(arrays))}

    per_subject = corpus.sessions_per_subject
    verification = np.flatnonzero(~np.array(enrol))  # a session's owner is index // per_subject
    comparisons: list[tuple[str, str]] = []
    labels: list[int] = []
    for position in range(len(indices)):
        mine = np.arange(position * per_subject, (position + 1) * per_subject)
        enrolled, own = mine[:enrol_sessions], mine[enrol_sessions:]
        genuine = [(name_of[int(a)], name_of[int(b)]) for a in enrolled for b in own]
        probes = _other_subjects_sessions(verification, position, per_subject, len(genuine), rng)
        impostor = [(name_of[int(enrolled[k % len(enrolled)])], name_of[int(b)])
                    for k, b in enumerate(probes)]
        pairs = genuine + impostor
        marks = [1] * len(genuine) + [0] * len(impostor)
        shuffle = rng.permutation(len(pairs))
        comparisons += [pairs[k] for k in shuffle]
        labels += [marks[k] for k in shuffle]
    return sessions, comparisons, labels, subject_of


def _other_subjects_sessions(verification: np.ndarray, position: int, per_subject: int, count: int,
                             rng: np.random.Generator) -> np.ndarray:
    """``count`` verification sessions of subjects other than the one at ``position``, at random
    with replacement: redrawing the few that hit the subject's own keeps the cost linear in the
    evaluation set (a mask of every other session per subject made 15,000 subjects quadratic)."""
    probes = rng.choice(verification, size=count)
    while (own := np.flatnonzero(probes // per_subject == position)).size:
        probes[own] = rng.choice(verification, size=own.size)
    return probes


def write_kvc(root: str | Path, *, scenario: str = "desktop", subjects: int, test_subjects: int,
              seed: int = 0, difficulty: float = 1.0, enrol_sessions: int = ENROL_SESSIONS,
              dev_set: bool = True) -> KVCFiles:
    """Write a synthetic corpus as KVC-onGoing files plus a ground-truth file.

    Subjects ``0..subjects-1`` form the dev set; the next ``test_subjects`` subjects are
    held out into ``*_test_sessions.npy`` and ``*_comparisons.txt``. The ground truth
    (``*_ground_truth.json``: ``labels`` per comparison, 1 = genuine, and ``session_subject``)
    is what the challenge keeps secret. ``dev_set=False`` writes the evaluation files only: a
    dev set of KVC's size is one pickled dict held whole in memory, while ``eerpipe shard
    --source synth:SUBJECTS:SEED`` streams the same subjects into shards.
    """
    if subjects < 1:
        raise ValueError("--subjects must be at least 1")
    corpus = SynthCorpus(scenario, seed, difficulty)
    paths = kvc_paths(root, scenario)
    paths.dev_set.parent.mkdir(parents=True, exist_ok=True)
    if dev_set:  # numpy's stubs do not know that np.save pickles a dict (allow_pickle)
        np.save(paths.dev_set, corpus.dev_set(range(subjects)), allow_pickle=True)  # type: ignore[arg-type]
    sessions, comparisons, labels, subject_of = evaluation_set(
        corpus, range(subjects, subjects + test_subjects), enrol_sessions)
    np.save(paths.test_sessions, sessions, allow_pickle=True)  # type: ignore[arg-type]  # a pickled dict
    paths.comparisons.write_text(str(comparisons) + "\n")
    paths.ground_truth.write_text(json.dumps({
        "scenario": scenario, "seed": seed, "difficulty": difficulty,
        "dev_subjects": subjects, "test_subjects": test_subjects,
        "labels": labels, "session_subject": subject_of,
    }))
    return paths
