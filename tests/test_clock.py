"""The ``time/…`` metrics on a GPU: a phase's time is its own only if the clock first waits for the
device's queued kernels; the trainer waits on the steps it logs, and never on a CPU."""

from __future__ import annotations

import torch

from pipeline.training.clock import clock
from pipeline.training.metrics_sink import StepTimer

GPU = torch.device("cuda", 1)


def waits(monkeypatch) -> list[torch.device]:
    """The devices waited for (``torch.cuda.synchronize`` recorded, so that this runs on a CPU)."""
    waited: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    return waited


def test_the_clock_waits_for_a_cuda_device_and_never_for_the_cpu(monkeypatch):
    waited = waits(monkeypatch)
    clock(), clock(torch.device("cpu"))
    assert waited == []
    clock(GPU)
    assert waited == [GPU]


def test_a_step_timer_waits_for_its_device_only_while_it_measures_a_step(monkeypatch):
    waited = waits(monkeypatch)
    timer = StepTimer(GPU)
    timer.lap("data")
    assert waited == [] and timer.wait_for is None
    timer.measuring = True
    timer.lap("model"), timer.lap("backward")
    assert waited == [GPU, GPU] and timer.wait_for == GPU
    assert set(timer.phases) == {"data", "model", "backward"} and min(timer.phases.values()) >= 0
