"""``make bench``'s EERLoss measurements run (at toy sizes): a benchmark that no longer matches
the loss's code fails here, not on the next engineer's benchmark day."""

from __future__ import annotations

import json

import pytest

from bench.eer_loss import child


@pytest.mark.parametrize("kind, world",
                         [("gram", 1), ("contrastive", 1), ("eer", 1), ("eer", 2), ("fmr", 1), ("band", 2)])
def test_each_measurement_reports_seconds_and_peak_memory(kind, world, capsys):
    child(kind, 64, 1, world)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["seconds"] > 0 and set(result) == {"seconds", "peak_mb"}
