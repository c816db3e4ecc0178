"""The source protocol: a raw corpus as a list of subjects, and the two sources that need no
parsing of their own (KVC-onGoing's dev set, the synthetic generator).

A :class:`Source` is opened once in the sharding process (``open``: the candidate subject
ids, unique, in a stable order, plus what was rejected while listing them) and then asked
for one subject at a time (``load``), possibly from forked worker processes. The Aalto
sources are in :mod:`sharding.aalto`; the specs that name a source (``kvc:DIR``, ``synth:N``…)
in :mod:`sharding.source_spec`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from sharding.kvc import find_files, read_dev_set
from sharding.synth import SynthCorpus
from sharding.validate import dedupe


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
