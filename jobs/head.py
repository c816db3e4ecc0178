"""Ray's job client, with a time limit on every HTTP call to the head, and that limit.

``JobSubmissionClient`` sends each request with ``requests.request`` and no timeout (ray 2.60,
``ray/dashboard/modules/dashboard_sdk.py``, ``SubmissionClient._do_request``), so a head that
accepts connections and never answers (a wedged dashboard, a proxy holding the port) blocks a
command for good. Every HTTP call the client makes goes through ``_do_request``, which passes
extra keyword arguments on to ``requests``: the version check when the client is built,
submissions, package uploads, job status, logs, stop. The limit is set there, for connecting
and for each read.

Not covered: ``tail_job_logs`` (``--follow``) streams over a websocket (aiohttp) that may
rightly stay silent for as long as a job prints nothing; aiohttp bounds its handshake (5 min).
A ``ray://`` address is first resolved through Ray Client, which gives up by itself (about 30 s).
"""

from __future__ import annotations

import math
import os
from typing import Any

import requests
from ray.job_submission import JobSubmissionClient

from jobs.errors import JobError

TIMEOUT_VARIABLE = "EERPIPE_HEAD_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 30.0


def head_timeout() -> float:
    """Seconds a call to the head may wait to connect, and for each read:
    ``$EERPIPE_HEAD_TIMEOUT_S``, else 30."""
    text = os.environ.get(TIMEOUT_VARIABLE) or str(DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise JobError(f"{TIMEOUT_VARIABLE}={text!r}: expected a positive number of seconds")
    return seconds


class BoundedJobClient(JobSubmissionClient):
    """A job client whose calls to the head fail with :class:`JobError` after ``timeout_s``
    without an answer, naming the head's address."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s  # set first: Ray's __init__ makes the first request
        super().__init__(address)

    def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout_s)
        try:
            return super()._do_request(method, endpoint, **kwargs)
        except requests.Timeout as error:
            raise JobError(
                f"{self._address}: no answer from the Ray head within {self.timeout_s:g} s "
                f"({TIMEOUT_VARIABLE} sets the wait)"
            ) from error
