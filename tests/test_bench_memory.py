"""``make bench``'s memory benchmark runs at toy sizes (a queue of one global batch, two steps):
a benchmark that no longer matches the training code fails here."""

from __future__ import annotations

import pytest

import bench.memory
from bench.memory import Arm, measure, table

pytestmark = pytest.mark.slow


def test_each_arm_is_measured_at_its_full_queue(monkeypatch):
    monkeypatch.setattr(bench.memory, "MIN_STEPS", 1)  # the arm's size alone sets its steps
    arms = (Arm(256),)  # one Ray run (the suite's time is precious); it is its own reference
    config, rows = measure(arms)

    assert [arm for arm, _ in rows] == list(arms)
    (_, metrics), = rows
    assert metrics["step"] == 2  # 256 rows = 1 global batch, full before step 2
    assert metrics["train/memory_rows"] == 256 and metrics["time/enqueue"] > 0 and metrics["time/momentum_encoder"] > 0
    lines = table(config, rows).splitlines()
    assert len(lines) == 2 + len(arms) and " 1.00 " in lines[2]  # the reference against itself


def test_an_arm_trains_until_its_last_step_scores_a_full_queue():
    assert Arm(0).steps(256) == bench.memory.MIN_STEPS
    assert (Arm(16_384).steps(256), Arm(65_536).steps(256)) == (65, 257)
