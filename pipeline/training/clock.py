"""The clock of the ``time/…`` metrics (the host's, once the device has finished its queued work)
and the timer of a step's phases that reads it.

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


STEP_PHASES = ("data", "model", "backward", "optimizer")  # a step's time; validation etc. excluded


class StepTimer:
    """Wall time of a step's phases on this rank's clock; ``lap(phase)`` ends ``phase``.

    While ``measuring`` (set for the steps that are logged, from the lap that starts them), every
    lap first waits for ``device`` (:func:`clock`), so a GPU phase's time is its own.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device, self.measuring = device, False
        self.last = clock()
        self.phases: dict[str, float] = {}

    @property
    def wait_for(self) -> torch.device | None:
        """The device the phases of this step wait for, if it is measured."""
        return self.device if self.measuring else None

    def lap(self, phase: str) -> None:
        now = clock(self.wait_for)
        self.phases[phase], self.last = now - self.last, now
