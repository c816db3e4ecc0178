"""Atomic publication of one file on any fsspec filesystem: readers see it whole or not at all;
creation only if absent, removal and replacement only if unchanged."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
from botocore.exceptions import ClientError
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

    ``False`` may also answer a create that went through: a retry after a lost reply is refused
    (S3 answers 412; NFS may answer ``EEXIST`` to a retried ``link``). Read the file back to
    know whose it is.
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


def remove_if(fs: fsspec.AbstractFileSystem, path: str, wanted: Callable[[bytes], bool]) -> bool:
    """Remove ``path`` if ``wanted(its content)``; ``True`` if it was removed.

    A check, then a removal, would remove a file that another writer put in its place in
    between. A local disk therefore first renames ``path`` aside (atomic: of racing callers
    only one moves a given file), checks the file it moved, and puts an unwanted one back. An
    object store gets a removal conditional on the ETag of the content checked
    (``If-Match``, honoured by AWS S3 and moto; a store that ignores it removes whatever is
    there, the few milliseconds after the check).

    The local scheme leaves one window: while an unwanted file is aside (microseconds),
    another file can be created at ``path``; the one aside is then dropped.
    """
    if not isinstance(fs, LocalFileSystem):
        return _object_call_if(fs, path, wanted, "delete_object")
    aside = _temporary(path)
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    removed = False
    try:
        removed = wanted(Path(aside).read_bytes())
    finally:
        if removed:
            os.remove(aside)
        else:
            _put_back(aside, path)
    return removed


def _put_back(aside: str, path: str) -> None:
    """Return a file moved aside to ``path``, unless another was created there meanwhile."""
    with contextlib.suppress(FileExistsError):
        os.link(aside, path)
    os.remove(aside)


def replace_if(fs: fsspec.AbstractFileSystem, path: str, data: bytes,
               wanted: Callable[[bytes], bool]) -> bool:
    """Replace the content of ``path`` with ``data`` if ``wanted(its content)``; ``True`` if it
    was replaced (a missing ``path`` is not created).

    An object store gets an upload conditional on the ETag of the content checked (``If-Match``,
    honoured by AWS S3, MinIO and moto). A local disk writes ``data`` to a temporary first, then
    checks ``path`` and renames the temporary over it: readers see either content whole, and the
    window in which another writer's file can be replaced is that of a check and a rename
    (microseconds), not that of a write.
    """
    if not isinstance(fs, LocalFileSystem):
        return _object_call_if(fs, path, wanted, "put_object", Body=data)
    temporary = _temporary(path)
    try:
        _write_durably(temporary, data)
        if not wanted(Path(path).read_bytes()):
            return False
        os.replace(temporary, path)
    except FileNotFoundError:  # no such file, or no such folder: nothing to replace
        return False
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return True


def _object_call_if(fs: fsspec.AbstractFileSystem, path: str, wanted: Callable[[bytes], bool],
                    method: str, **arguments: Any) -> bool:
    """The S3 call ``method`` on ``path`` if ``wanted(its content)``, conditional on the ETag of
    that content (``False``: not wanted, gone, or replaced since the check). The ETag is read
    before the content: if the content checked is the one wanted, the ETag is that content's (a
    wanted content, once replaced, never returns: callers check a unique token)."""
    bucket, key, _ = fs.split_path(path)
    try:
        etag = fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"]
        if not wanted(fs.cat_file(path)):
            return False
        fs.call_s3(method, Bucket=bucket, Key=key, IfMatch=etag, **arguments)
    except FileNotFoundError:  # gone already; or removed by a retry whose first reply was lost
        return False
    except OSError as error:
        if _precondition_failed(error):  # replaced since the check
            return False
        raise
    finally:
        fs.invalidate_cache(path)
    return True


def _precondition_failed(error: OSError) -> bool:
    """Whether s3fs raised ``error`` for an HTTP 412 (its ``EINVAL`` says no more)."""
    cause = error.__cause__
    return (isinstance(cause, ClientError)
            and cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412)


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
