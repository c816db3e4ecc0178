"""Where shards live: a local folder, ``file://`` or ``s3://`` through fsspec, every call bounded.

S3 endpoint, region and credentials come from the environment (``AWS_ENDPOINT_URL``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or any
boto credential source) or from explicit ``storage_options``; they are never written
anywhere by this project.

Every S3 call is bounded (:func:`s3_config`): connecting within ``EERPIPE_S3_CONNECT_TIMEOUT``
seconds (default 10), each part of an answer within ``EERPIPE_S3_READ_TIMEOUT`` seconds of the
last (default 30; the clock starts once a request's body is sent: an upload of any size is not
cut short),
``AWS_MAX_ATTEMPTS`` attempts (default 3, botocore's "standard" retries: throttling, 5xx,
dropped connections and timeouts), tried twice by s3fs. A store that dies mid-job thus fails a
call after about 3 minutes; the first call of a command (:func:`check_writable`,
:func:`check_readable`) gets one attempt and at most 10 s, so a wrong endpoint is named within
seconds, before any work starts.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from aiobotocore.httpsession import AIOHTTPSession
from botocore.exceptions import BotoCoreError
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

CONNECT_TIMEOUT_ENV = "EERPIPE_S3_CONNECT_TIMEOUT"
READ_TIMEOUT_ENV = "EERPIPE_S3_READ_TIMEOUT"
MAX_ATTEMPTS_ENV = "AWS_MAX_ATTEMPTS"  # botocore's own variable, honoured as botocore would
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_MAX_ATTEMPTS = 3
PROBE_READ_TIMEOUT_S = 10.0
# s3fs tries each call 5 times over botocore's attempts; twice still retries a body cut off
# mid-read, which botocore does not
_S3FS_TRIES = 2
STORAGE_FAILURES = (OSError, BotoCoreError)  # what a store raises: full disk, timeout, refusal


class StorageError(RuntimeError):
    """Storage is unreachable, misconfigured, full or refuses our credentials."""


class ExpectFreeHTTPSession(AIOHTTPSession):
    """aiobotocore's HTTP session, without asking for ``100 Continue`` before an upload.

    botocore adds ``Expect: 100-continue`` to every upload, and aiohttp then waits for the
    interim answer with no time limit (the read timeout starts once the body is sent): an
    endpoint that accepts connections and never answers hangs the upload forever. Without the
    header the body goes out at once and the read timeout bounds the wait, as with plain
    botocore, which stops waiting for the interim answer after a second.
    """

    async def send(self, request: Any) -> Any:
        request.headers.pop("Expect", None)
        return await super().send(request)


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


def s3_config() -> dict[str, Any]:
    """botocore settings that bound every S3 call (see the module docstring)."""
    return {"connect_timeout": setting(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT_S, float),
            "read_timeout": setting(READ_TIMEOUT_ENV, DEFAULT_READ_TIMEOUT_S, float),
            "retries": {"total_max_attempts": setting(MAX_ATTEMPTS_ENV, DEFAULT_MAX_ATTEMPTS, int),
                        "mode": "standard"},
            "http_session_cls": ExpectFreeHTTPSession}


def setting(name: str, default: float, kind: type) -> Any:
    """A positive number from the environment variable ``name``; a bad one is refused by name."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if not (math.isfinite(value) and value > 0):
        unit = "number of seconds" if kind is float else "whole number"
        raise StorageError(f"{name}={text!r}: expected a positive {unit}")
    return value


def open_fs(url: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, root path)`` for ``url``; S3 settings default from the environment,
    and every S3 call is bounded in time (:func:`s3_config`; ``config_kwargs`` overrides)."""
    if url.startswith("s3://"):
        storage_options = {**s3_options_from_env(), **storage_options, "config_kwargs": {
            **s3_config(), **storage_options.get("config_kwargs", {})}}
    fs, root = url_to_fs(url, **storage_options)
    if url.startswith("s3://"):
        fs.retries = _S3FS_TRIES
    return fs, root.rstrip("/")


def _probing_fs(url: str, storage_options: dict[str, Any]) -> fsspec.AbstractFileSystem:
    """The filesystem for a command's first call: one attempt, an answer within 10 s.

    A store that answers nothing is then named within seconds, rather than after every
    attempt at the full read timeout meant for a busy store in the middle of a job.
    """
    if not url.startswith("s3://"):
        return open_fs(url, **storage_options)[0]
    quick = {"read_timeout": min(PROBE_READ_TIMEOUT_S, s3_config()["read_timeout"]),
             "retries": {"total_max_attempts": 1, "mode": "standard"}}
    config = {**quick, **storage_options.get("config_kwargs", {})}
    fs = open_fs(url, **{**storage_options, "config_kwargs": config})[0]
    fs.retries = 1
    return fs


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
        probing = _probing_fs(url, storage_options)
        probing.pipe_file(probe, b"ok")
        probing.rm_file(probe)
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
        if not _probing_fs(url, storage_options).exists(root):
            raise FileNotFoundError(root)
    except Exception as error:  # noqa: BLE001
        raise StorageError(_explain(url, error)) from error
    return fs, root


def _explain(url: str, error: Exception) -> str:
    text = describe_failure(error)
    hint = ""
    if url.startswith("s3://") and not _is_timeout(error):
        if "credential" in text.lower() or "NoCredentials" in text:
            hint = " (no S3 credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
        else:
            hint = " (check AWS_ENDPOINT_URL, the bucket name and the credentials)"
    return f"cannot use storage {url!r}: {text}{hint}"


def describe_failure(error: BaseException) -> str:
    """A store's failure in words: ``No space left on device (ENOSPC)`` and the file, if the
    error names one, or the store's own message (which names the endpoint), with what to do
    about a timeout."""
    if isinstance(error, OSError) and error.errno is not None and error.errno in errno.errorcode:
        text = f"{error.strerror or os.strerror(error.errno)} ({errno.errorcode[error.errno]})"
        return f"{text}: {error.filename}" if error.filename is not None else text
    text = f"{type(error).__name__}: {error}"
    if _is_timeout(error):
        text += (" (no answer in time: check AWS_ENDPOINT_URL, or give a slow store more time "
                 f"with {CONNECT_TIMEOUT_ENV} / {READ_TIMEOUT_ENV})")
    return text


def _is_timeout(error: BaseException) -> bool:
    return isinstance(error, TimeoutError) or "Timeout" in type(error).__name__


@contextmanager
def failures_named(what: str, advice: str = "") -> Iterator[None]:
    """Turn a store's failure below (a full disk, a timeout, refused credentials) into one
    :class:`StorageError` line: ``what`` (e.g. ``"cannot write s3://b/x/a.tar"``), the cause,
    then ``advice``. A missing file stays ``FileNotFoundError``: callers take it as an answer."""
    try:
        yield
    except FileNotFoundError:
        raise
    except STORAGE_FAILURES as error:
        message = f"{what}: {describe_failure(error)}" + (f"; {advice}" if advice else "")
        raise StorageError(message) from error


def location(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` as a user would write it: a local path, or ``s3://bucket/key``."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
