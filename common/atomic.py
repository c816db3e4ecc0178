"""Atomic publication of one file on any fsspec filesystem: readers see it whole or not at all."""

from __future__ import annotations

import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``path`` appear whole or not at all, creating its folder.

    A local disk gets a hidden temporary beside the target, fsynced, then renamed over it (a
    rename within one folder is atomic); a write that fails (a full disk) removes its
    temporary and leaves the target as it was. An object store needs nothing more than one
    upload: it exposes an object only once its upload has completed.
    """
    _make_folder(fs, path)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    temporary = _temporary(path)
    try:
        _write_durably(temporary, data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; ``False`` if it did.

    Of any number of writers racing for one path exactly one gets ``True``, and a reader never
    sees the file partly written. A local disk writes a temporary and hard-links it to ``path``
    (``link`` fails if ``path`` exists, atomically, NFS included); an object store gets a
    conditional upload (``If-None-Match: *``, honoured by AWS S3, MinIO and moto).
    """
    _make_folder(fs, path)
    if not isinstance(fs, LocalFileSystem):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    temporary = _temporary(path)
    try:
        _write_durably(temporary, data)
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return True


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`write_atomic`'s leftovers (a crash mid-write)."""
    return name.startswith(".") and name.endswith(".tmp")


def _make_folder(fs: fsspec.AbstractFileSystem, path: str) -> None:
    folder = path.rpartition("/")[0]
    if folder:
        fs.makedirs(folder, exist_ok=True)


def _temporary(path: str) -> str:
    """A hidden name beside ``path``, private to this call: threads of one process may write
    the same path at once (see :func:`is_temporary`)."""
    folder, _, name = path.rpartition("/")
    hidden = f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    return f"{folder}/{hidden}" if folder else hidden


def _write_durably(path: str, data: bytes) -> None:
    """Write and fsync: a full disk often only says so at the fsync (delayed allocation)."""
    with open(path, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
