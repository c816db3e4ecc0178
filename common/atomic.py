"""Atomic publication of one file on any fsspec filesystem: readers see it whole or not at all."""

from __future__ import annotations

import os

import fsspec
from fsspec.implementations.local import LocalFileSystem


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``path`` appear whole or not at all, creating its folder.

    A local disk gets a hidden temporary beside the target, fsynced, then renamed over it (a
    rename within one folder is atomic). An object store needs nothing more than one upload:
    it exposes an object only once its upload has completed.
    """
    folder, _, name = path.rpartition("/")
    if folder:
        fs.makedirs(folder, exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    temporary = f"{folder}/.{name}.{os.getpid()}.tmp" if folder else f".{name}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`write_atomic`'s leftovers (a crash mid-write)."""
    return name.startswith(".") and name.endswith(".tmp")
