"""Readers for the KVC-onGoing files exactly as distributed, without trusting their pickles.

``*_dev_set.npy`` and ``*_test_sessions.npy`` are object arrays: ``np.load(allow_pickle=True)``
would run ``pickle.load`` on the file body, and a pickle can execute anything. We parse the
``.npy`` header with :mod:`numpy.lib.format` and unpickle the body with
:class:`RestrictedUnpickler`, which can rebuild numpy arrays, dtypes and scalars and builtin
containers, and refuses every other global with :class:`KVCFileError` naming the file.
"""

from __future__ import annotations

import _codecs
import builtins
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.lib.format as npy_format

try:  # numpy >= 2 keeps the pickle helpers in numpy._core; files written by 1.x name numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.26
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


class KVCFileError(ValueError):
    """A KVC file is missing, truncated, corrupt, malicious or not shaped like the challenge's."""


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (the mark of a malicious file)."""


def _allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Protocol 2 spells bytes as _codecs.encode(str, "latin1"); a pure function.
        ("_codecs", "encode"): _codecs.encode,
    }
    for package in ("numpy._core", "numpy.core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = _multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = _multiarray.scalar
        # a private numpy function, absent from its stubs
        allowed[(f"{package}.numeric", "_frombuffer")] = _numeric._frombuffer  # type: ignore[attr-defined]
    for name in ("set", "frozenset", "bytearray", "complex"):
        allowed[("builtins", name)] = getattr(builtins, name)
    return allowed


_ALLOWED = _allowed()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes, scalars and builtin containers; refuses anything else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"{module}.{name}") from None


def _read_header(stream: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(stream)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(stream)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(stream)
    raise ValueError(f"unsupported .npy format version {version}")


def load_npy(path: str | Path) -> Any:
    """The content of a ``.npy`` file; object arrays go through :class:`RestrictedUnpickler`.

    A 0-d object array (how ``np.save`` stores a dict) is returned as its item.
    """
    path = Path(path)
    try:
        stream = open(path, "rb")  # streamed: a real dev set is gigabytes
    except OSError as error:
        raise KVCFileError(f"{path}: cannot read ({error.strerror or error})") from error
    with stream:
        try:
            shape, _, dtype = _read_header(stream)
        except Exception as error:  # noqa: BLE001 - numpy raises ValueError, EOFError, SyntaxError...
            raise KVCFileError(f"{path}: not a valid .npy file ({error})") from error
        try:
            if not dtype.hasobject:
                stream.seek(0)
                return np.load(stream, allow_pickle=False)
            array = RestrictedUnpickler(stream).load()
        except ForbiddenGlobal as error:
            raise KVCFileError(
                f"{path}: refused to load: its pickle names {error}, which is not a numpy array, "
                "dtype or builtin container (the file may be malicious; it was not executed)"
            ) from error
        except Exception as error:  # noqa: BLE001 - truncation surfaces as many exception types
            raise KVCFileError(f"{path}: truncated or corrupt ({type(error).__name__}: {error})") from error
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
        raise KVCFileError(f"{path}: corrupt: the pickled body does not match its .npy header")
    return array.item() if array.shape == () else array


def _as_dict(path: Path, value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise KVCFileError(f"{path}: expected a pickled dict of {what}, found {type(value).__name__}")
    return value


def read_dev_set(path: str | Path) -> list[tuple[str, Any]]:
    """``(user id, {session id: array})`` pairs of a ``*_dev_set.npy``, in file order.

    Ids are returned as strings; a list (not a dict) so that ids that collide once made
    strings (``1`` and ``"1"``) reach the caller, which counts them as duplicates. Session
    values are returned unchecked: bad sessions are rejected one by one downstream.
    """
    path = Path(path)
    users = _as_dict(path, load_npy(path), "users")
    return [(str(user), sessions) for user, sessions in users.items()]


def read_test_sessions(path: str | Path) -> dict[str, Any]:
    """Anonymised session id → ``[n_keys, 3]`` array of a ``*_test_sessions.npy``."""
    path = Path(path)
    return {str(k): v for k, v in _as_dict(path, load_npy(path), "sessions").items()}


_ID = r"""\s*(?:'([^'\\\n]*)'|"([^"\\\n]*)"|(-?\d+))\s*"""  # a quoted string without escapes, or an integer
_PAIR = re.compile(rf"\s*[(\[]{_ID},{_ID}[)\]]\s*")
_COMMA = re.compile(r"\s*,")
_BLANK = re.compile(r"\s*")


def read_comparisons(path: str | Path) -> list[tuple[str, str]]:
    """The ``(session_a, session_b)`` pairs of a comparisons file: one Python list literal of
    pairs of session ids (strings or integers), read pair by pair and never evaluated.

    Why not ``ast.literal_eval``: its syntax tree of KVC's 1.5 M comparisons took 4.9 GB and two
    minutes; this reader holds the pairs alone (``bench/rehearsal.py``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise KVCFileError(f"{path}: cannot read ({error})") from error
    if not (text.startswith("[") and text.endswith("]")):
        raise KVCFileError(f"{path}: expected a Python list of (session_a, session_b) pairs")
    pairs, end = [], len(text) - 1
    position = _BLANK.match(text, 1, end).end()  # type: ignore[union-attr]  # \s* always matches
    while position < end:
        pair = _PAIR.match(text, position, end)
        if pair is None:
            raise KVCFileError(f"{path}: expected a (session_a, session_b) pair at character {position}, "
                               f"found {text[position:position + 40]!r}")
        groups = pair.groups()
        pairs.append((next(g for g in groups[:3] if g is not None), next(g for g in groups[3:] if g is not None)))
        comma = _COMMA.match(text, pair.end(), end)
        if comma is None and pair.end() < end:
            raise KVCFileError(f"{path}: expected ',' between pairs at character {pair.end()}")
        position = _BLANK.match(text, comma.end() if comma else pair.end(), end).end()  # type: ignore[union-attr]
    return pairs


def find_files(root: str | Path, scenario: str | None = None) -> tuple[str, dict[str, Path]]:
    """Locate one scenario's KVC files under ``root`` (the data folder or the scenario folder).

    Returns ``(scenario, {"dev_set", "test_sessions", "comparisons"} → path)``; only the dev
    set must exist. Accepts both ``*_comparisons.txt`` and ``*_comparison_list.txt``.
    """
    root = Path(root)
    candidates = [scenario] if scenario else ["desktop", "mobile"]
    found = []
    for name in candidates:
        for folder in (root / name, root):
            if (folder / f"{name}_dev_set.npy").is_file():
                found.append((name, folder))
                break
    if not found:
        wanted = " or ".join(f"{name}_dev_set.npy" for name in candidates)
        raise KVCFileError(f"{root}: no {wanted} here or in a {'/'.join(candidates)} subfolder")
    if len(found) > 1:
        raise KVCFileError(f"{root}: holds both desktop and mobile files; name one: kvc:{root}:SCENARIO")
    name, folder = found[0]
    comparisons = folder / f"{name}_comparisons.txt"
    if not comparisons.exists():
        comparisons = folder / f"{name}_comparison_list.txt"
    return name, {
        "dev_set": folder / f"{name}_dev_set.npy",
        "test_sessions": folder / f"{name}_test_sessions.npy",
        "comparisons": comparisons,
    }
