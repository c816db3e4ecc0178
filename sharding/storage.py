"""Where shards live: a local folder, ``file://`` or ``s3://`` through fsspec.

S3 endpoint, region and credentials come from the environment (``AWS_ENDPOINT_URL``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or any
boto credential source) or from explicit ``storage_options``; they are never written
anywhere by this project.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


class StorageError(RuntimeError):
    """Storage is unreachable, misconfigured or refuses our credentials."""


def s3_options_from_env() -> dict[str, Any]:
    """s3fs options for a custom endpoint (MinIO, moto, Ceph) taken from the environment."""
    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def open_fs(url: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, root path)`` for ``url``; S3 settings default from the environment."""
    if url.startswith("s3://"):
        storage_options = {**s3_options_from_env(), **storage_options}
    fs, root = url_to_fs(url, **storage_options)
    return fs, root.rstrip("/")


def check_writable(url: str, *, create: bool = True,
                   **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Fail fast, before any work starts, if ``url`` cannot be written with our credentials.

    ``create=False`` leaves a missing local folder uncreated (its nearest existing parent must
    be a writable folder), so that a job refused later leaves nothing behind.
    """
    fs, root = open_fs(url, **storage_options)
    probe = f"{root}/.eerpipe-write-probe"
    try:
        if isinstance(fs, LocalFileSystem) and not fs.exists(root) and not create:
            _check_creatable(Path(root))
            return fs, root
        if not url.startswith("s3://"):  # on S3, makedirs would create a mistyped bucket
            fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as error:  # noqa: BLE001 - any backend error means "cannot write here"
        raise StorageError(_explain(url, error)) from error
    return fs, root


def _check_creatable(folder: Path) -> None:
    """Raise ``PermissionError`` unless ``folder`` could be created (it does not exist)."""
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {folder}: {parent} is not a writable folder")


def check_readable(url: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Fail fast if ``url`` cannot be listed (unreachable endpoint, missing credentials)."""
    fs, root = open_fs(url, **storage_options)
    try:
        if not fs.exists(root):
            raise FileNotFoundError(root)
    except Exception as error:  # noqa: BLE001
        raise StorageError(_explain(url, error)) from error
    return fs, root


def _explain(url: str, error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    hint = ""
    if url.startswith("s3://"):
        if "credential" in text.lower() or "NoCredentials" in text:
            hint = " (no S3 credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
        else:
            hint = " (check AWS_ENDPOINT_URL, the bucket name and the credentials)"
    return f"cannot use storage {url!r}: {text}{hint}"
