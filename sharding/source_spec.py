"""Source specs: the strings that name a source on the command line and in a manifest.

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

from pathlib import Path
from typing import Any

from sharding.aalto import AaltoDesktopSource, AaltoMobileSource
from sharding.participants import ParticipantLists
from sharding.sources import KVCSource, Source, SourceError, SynthSource
from sharding.synth import SCENARIOS

SPEC_HELP = ("kvc:DIR[:SCENARIO] | aalto-desktop:DIR | aalto-mobile:DIR | "
             "synth:N[:SEED[:DIFFICULTY[:SCENARIO]]]")


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
