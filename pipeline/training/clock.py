"""The clock of the ``time/…`` metrics: the host's, once the device has finished its queued work.

Why: CUDA runs kernels asynchronously, so the host's clock read right after a phase returns
measures the launching of that phase's kernels, and the phase's real time lands in whichever
later phase first waits for the device (a ``.item()``, a collective, the optimizer). Waiting for
the device (``torch.cuda.synchronize``) gives each phase its own time but costs the overlap of
host and device, so the trainer waits only on the steps it logs; a CPU has nothing to wait for.
"""

from __future__ import annotations

import time

import torch


def clock(wait_for: torch.device | None = None) -> float:
    """``time.perf_counter()`` after ``wait_for``'s queued work (none: the host's clock now)."""
    if wait_for is not None and wait_for.type == "cuda":
        torch.cuda.synchronize(wait_for)
    return time.perf_counter()
