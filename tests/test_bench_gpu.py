"""``make bench-gpu``: refuses to report CPU numbers as GPU ones; its measurements run anywhere.

No GPU here: the measuring functions run on the CPU at toy sizes, so on a GPU machine only the
device differs.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import torch

from bench.gpu import loader_rates, loss_cost, model_rate
from sharding.writer import write_shards

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_without_cuda_it_says_so_and_exits_non_zero():
    result = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=ROOT, capture_output=True, text=True,
                            env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and result.stdout == ""


def test_the_loss_and_its_gram_floor_are_timed_at_the_same_size():
    cost = loss_cost(64, CPU, repeats=1)
    assert set(cost) == {"gram", "eer"}
    for seconds, peak in cost.values():
        assert seconds > 0 and math.isnan(peak)  # GPU memory only on a GPU


def test_the_loader_and_the_model_report_sessions_per_second(tmp_path):
    write_shards("synth:40:0", str(tmp_path), subjects_per_shard=10, val_subjects=5, test_subjects=5)
    rates, batch = loader_rates(str(tmp_path), workers=(0, 2), batches=2, subjects=4, sessions=2)
    assert set(rates) == {0, 2} and min(rates.values()) > 0
    assert batch.features.shape[0] == 8
    assert model_rate(batch, CPU, size="small", repeats=1) > 0
