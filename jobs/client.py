"""Reach a Ray cluster's job API: which address, and the token that authenticates to it.

The Ray behaviours worked around here, all read in ray 2.60's source:

* ``JobSubmissionClient`` lets ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` override the
  address it is given (``ray.dashboard.utils.get_address_for_submission_client``); an explicit
  ``--address`` must win, so those variables are hidden while the client is built.
* The client sends the cluster's token (``Authorization: Bearer …``) only when
  ``RAY_AUTH_MODE=token`` is set in this process, even when ``RAY_AUTH_TOKEN`` is; ``ray://``
  addresses need the mode too, for their gRPC calls. Like ``ray.init`` joining an existing
  cluster, token mode is switched on when a token can be found (``RAY_AUTH_TOKEN``, the file
  at ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``) unless ``RAY_AUTH_MODE`` says otherwise.
  The token travels only in that header: never in a job's entrypoint, metadata or environment.
* A ``ray://`` address reaches the job API through a Ray Client server that the head forks per
  connection; the fork intermittently dies in gRPC (ray-project/ray#63202, measured here: 2 in
  10 connections), and the head answers "Initialization failure from server". That refusal
  is retried; every other error is not.
* The client's HTTP calls have no time limit: a head that takes the connection and never
  answers would hang a command for good. Every call is bounded by ``$EERPIPE_HEAD_TIMEOUT_S``
  seconds (default 30) to connect and to each read (:mod:`jobs.head`, which reads that setting).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from jobs.errors import JobError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
RAY_CLIENT_RETRIES = 3


def cluster_address(address: str | None = None) -> str:
    """The job API address: ``address`` if given, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``."""
    for candidate in (address, *(os.environ.get(name) for name in ADDRESS_VARIABLES)):
        if candidate:
            return candidate.rstrip("/")
    raise JobError(
        "no cluster address: pass --address http://HEAD:8265 (or ray://HEAD:10001), or set RAY_ADDRESS"
    )


def connect(address: str | None = None) -> "JobSubmissionClient":
    """A job client for the cluster at ``address`` (see :func:`cluster_address`), token included,
    whose every call to the head is bounded by :func:`jobs.head.head_timeout`."""
    from ray.exceptions import AuthenticationError

    from jobs.head import head_timeout

    target = cluster_address(address)
    timeout_s = head_timeout()
    _use_token_if_available()
    try:
        return _job_client(target, timeout_s)
    except AuthenticationError as error:
        raise JobError(f"{target} refused the token: {error}") from error
    except ConnectionError as error:
        raise JobError(f"cannot reach a Ray job API at {target}: {error}") from error


def _job_client(target: str, timeout_s: float) -> "JobSubmissionClient":
    from jobs.head import BoundedJobClient

    retries = RAY_CLIENT_RETRIES if target.startswith("ray://") else 0
    while True:
        try:
            with _hidden(ADDRESS_VARIABLES):
                return BoundedJobClient(target, timeout_s)
        except ConnectionAbortedError:  # the head's per-connection server died starting
            if retries == 0:
                raise
            retries -= 1
            time.sleep(1)


def _use_token_if_available() -> None:
    if "RAY_AUTH_MODE" in os.environ:
        return
    # ray._raylet is compiled: mypy sees only part of it.
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray caches its config: make it read the mode again


@contextmanager
def _hidden(names: tuple[str, ...]) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
