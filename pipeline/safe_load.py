"""``torch.load`` that never runs code: every file the pipeline reads with torch goes through here.

``weights_only=True`` rebuilds tensors, builtin containers and the few classes a caller allows;
anything else (a pickle whose ``__reduce__`` would call a function) is refused. Torch's own
error advises retrying with ``weights_only=False`` — that is, running the file — so it is
replaced by one line saying what the file holds.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Sequence
from os import PathLike
from typing import Any

import torch


class UnsafeFileError(ValueError):
    """A file that a weights-only load refuses (or cannot parse); the message names the file."""


def load_weights_only(source: str | PathLike[str] | bytes, name: str, allowed: Sequence[Any] = (),
                      **kwargs: Any) -> Any:
    """``torch.load(source, weights_only=True)`` with ``allowed`` classes; ``name`` is the file
    as the user knows it (a URL, a checkpoint path) for the error message."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(stream, weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        raise UnsafeFileError(f"{name}: refused to load: {_reason(str(error))}") from None
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError, EOFError... on a bad file
        raise UnsafeFileError(f"{name}: unreadable ({type(error).__name__}: {_first_line(str(error))})") from None


def _reason(message: str) -> str:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if found:
        return f"it names {found.group(1)}, which is neither a tensor nor an allowed type (loading it would run code)"
    detail = message.partition("WeightsUnpickler error:")[2].strip()
    return f"not a torch file of tensors ({_first_line(detail) or 'unparseable'})"


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""
