"""``make bench-gpu`` and ``make smoke-gpu``: both refuse to run without CUDA; what they run
works anywhere.

No GPU here: the bench's measuring functions run on the CPU at toy sizes, the DeepSpeed training
step included (gloo instead of NCCL, bf16 autocast on the CPU); the smoke test's plan is checked
for several GPUs by the driver's own checks, and its verdicts on bad runs are checked on their
output (its commands are the ones tests/test_train.py and tests/test_evaluate.py run on the CPU).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu import (
    STEP_PHASES,
    Budget,
    affordable_rows,
    first_batch,
    gpu_config,
    loader_rates,
    loss_cost,
    step_engine,
    step_row,
)
from bench.smoke_gpu import (
    CONFIG,
    STOP_STEP,
    TOTAL_STEPS,
    SmokeFailure,
    check_launch,
    train_overrides,
    write_corpus,
)
from pipeline.config import TrainConfig
from pipeline.training import prepare
from pipeline.training.schedule import Schedule, schedule_of
from sharding.format import load_manifest
from sharding.writer import write_shards

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("shards")  # 30 training subjects in 3 shards
    write_shards("synth:40:0", str(out), subjects_per_shard=10, val_subjects=5, test_subjects=5)
    return str(out)


@pytest.mark.parametrize("module, says", [("bench.gpu", "no CUDA device"), ("bench.smoke_gpu", "no CUDA GPU")])
def test_without_cuda_it_says_so_and_exits_2(module, says):
    result = subprocess.run([sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True,
                            env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert says in result.stderr and result.stderr.count("\n") == 1 and result.stdout == ""


def test_the_training_step_is_the_gpu_config_s_deepspeed_step_split_into_its_phases(shards, one_rank):
    config = gpu_config(["model.options.size=small"])
    assert (config.train.precision, config.train.zero_stage, config.model.name) == ("bf16", 1, "type2branch")
    engine = step_engine(config, subjects=30)
    before = [p.detach().clone() for p in engine.module.parameters()]
    row = step_row(engine, first_batch(shards, subjects=4), repeats=1)
    assert row["sessions_per_s"] > 0 and math.isnan(row["peak_gb"])  # GPU memory only on a GPU
    assert all(row[phase] > 0 for phase in STEP_PHASES)
    assert row["step_s"] == pytest.approx(sum(row[phase] for phase in STEP_PHASES), rel=0.2)
    assert any(not torch.equal(b, p) for b, p in zip(before, engine.module.parameters()))  # the optimizer stepped


def test_the_loss_and_its_gram_floor_are_timed_at_the_same_size():
    cost = loss_cost(64, CPU, repeats=1)
    assert set(cost) == {"gram", "eer"}
    for seconds, peak in cost.values():
        assert seconds > 0 and math.isnan(peak)


def test_the_loader_reports_sessions_per_second_and_real_batches(shards):
    rates = loader_rates(shards, workers=(0, 2), batches=2, subjects=4)
    assert set(rates) == {0, 2} and min(rates.values()) > 0
    batch = first_batch(shards, subjects=4)
    assert batch.features.shape[:2] == (32, 100) and len(set(batch.labels.tolist())) == 4


def test_a_size_that_would_overrun_the_budget_is_skipped_and_says_so():
    measured = []

    def measure(size: int) -> float:
        measured.append(size)
        return 1.0  # seconds per call at every size: the next, twice as large, is estimated at 4 × 2 s

    rows = list(affordable_rows((1, 2, 4), Budget(5.0), calls=4, growth=1.0, measure=measure))
    assert measured == [1]
    assert rows[0] == (1, None)
    assert [size for size, _ in rows[1:]] == [2, 4] and all(reason.startswith("skipped: ~") for _, reason in rows[1:])


def test_the_first_size_out_of_gpu_memory_ends_the_section():
    def measure(size: int) -> float:
        if size >= 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 0.0

    rows = dict(affordable_rows((1, 2, 4, 8), Budget(60.0), calls=4, growth=1.0, measure=measure))
    assert rows == {1: None, 2: None, 4: "out of GPU memory", 8: "skipped: 4 ran out of GPU memory"}


def test_the_smoke_run_fits_the_driver_s_checks_and_lasts_its_steps_on_any_number_of_gpus(tmp_path):
    write_corpus(tmp_path / "shards", gpus=2)  # one shard per reader: 2 GPUs × 2 loader workers
    config = TrainConfig.load(CONFIG, train_overrides(tmp_path, gpus=2))
    assert (config.train.precision, config.train.zero_stage, config.model.options) == ("bf16", 1, {"size": "large"})
    prepare(config)  # everything `eerpipe train` checks before Ray starts
    manifest = load_manifest(str(tmp_path / "shards"))
    assert schedule_of(config, manifest) == Schedule(TOTAL_STEPS // 2, TOTAL_STEPS, TOTAL_STEPS)
    stopped = TrainConfig.load(CONFIG, [*train_overrides(tmp_path, gpus=2), f"train.max_steps={STOP_STEP}"])
    assert schedule_of(stopped, manifest).stop_step == STOP_STEP


def progress_lines(*steps: int, total: int, loss: str = "0.5000") -> str:
    """``eerpipe train``'s progress lines at ``steps`` (``pipeline/training/progress.py``), one wrapped."""
    lines = [f"step {step}/{total}  epoch 0  loss {loss}  val EER 31.25%  2290 sessions/s  ETA 0.0 min"
             for step in steps]
    lines[-1] = lines[-1].replace("  val", "\nval")  # as a narrow terminal wraps it
    return "\n".join(["Started training worker group of size 1:", *lines, "run folder:   runs/smoke-gpu"])


@pytest.mark.parametrize("output, first, last, why", [
    (progress_lines(10, 20, 30, 32, total=32), STOP_STEP, TOTAL_STEPS, "step 10, not after step 20: it did not resume"),
    (progress_lines(10, 16, total=20), 0, STOP_STEP, "reported steps [10, 16] of 20, expected up to 20"),
    (progress_lines(10, 16, 20, total=20, loss="nan"), 0, STOP_STEP, "a non-finite training loss"),
    ("Traceback ...\nRuntimeError: NCCL error", 0, STOP_STEP, "printed no progress line: RuntimeError: NCCL error"),
])
def test_a_launch_that_restarted_stopped_early_diverged_or_printed_nothing_fails_the_smoke_test(
    output, first, last, why
):
    with pytest.raises(SmokeFailure, match=re.escape(why)):
        check_launch(output, first, last)


def test_a_resumed_launch_s_last_progress_line_is_what_the_verdict_reports():
    last = check_launch(progress_lines(30, 32, total=32), STOP_STEP, TOTAL_STEPS)
    assert (last.step, last.total, last.loss, last.val_eer, last.sessions_per_s) == (32, 32, 0.5, 0.3125, 2290.0)
