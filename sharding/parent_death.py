"""A shard job's worker processes die with the job, even when it is SIGKILLed."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Make this worker die with the sharding process, even if that one is SIGKILLed.

    A killed parent never shuts its pool down, and forked workers blocked on the task queue
    would otherwise live on forever. Linux kills us itself (``PR_SET_PDEATHSIG``); elsewhere
    a watchdog thread notices that we were re-parented.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        threading.Event().wait(1.0)
    os._exit(1)
