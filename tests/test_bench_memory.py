"""``make bench``'s memory benchmark runs at toy sizes (a queue of two global batches, few
steps): a benchmark that no longer matches the training code fails here."""

from __future__ import annotations

import pytest

import bench.memory
from bench.memory import Arm, measure, table

pytestmark = pytest.mark.slow


def test_each_arm_is_measured_at_its_full_queue(monkeypatch):
    monkeypatch.setattr(bench.memory, "MIN_STEPS", 3)
    arms = (Arm(0), Arm(512))  # two Ray runs: the suite's time is precious
    config, rows = measure(arms)

    assert [arm for arm, _ in rows] == list(arms)
    assert [metrics["step"] for _, metrics in rows] == [3, 3]  # 512 rows = 2 global batches, full before step 3
    assert [metrics.get("train/memory_rows", 0) for _, metrics in rows] == [0, 512]
    assert rows[1][1]["time/momentum_encoder"] > 0 and "time/momentum_encoder" not in rows[0][1]
    lines = table(config, rows).splitlines()
    assert len(lines) == 2 + len(arms) and " 1.00 " in lines[2]  # the reference against itself
