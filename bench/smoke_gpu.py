"""``make smoke-gpu``: the GPU training path end to end, run as a user runs it, in under 8 minutes.

1. A small synthetic corpus is sharded in a temporary folder, sized so that every GPU here gets
   its own shards and the run lasts :data:`TOTAL_STEPS` steps whatever the number of GPUs.
2. ``eerpipe train --config configs/gpu.yaml`` (Type2Branch-large, EERLoss, ZeRO-1, bf16 autocast,
   NCCL, one rank per GPU) with local storage, no W&B, validations and checkpoints every
   :data:`EVERY` steps, stopped at step :data:`STOP_STEP` (``train.max_steps``: checkpointed there,
   as a preempted run would be).
3. The same command without the stop: it must resume after step :data:`STOP_STEP`, not restart,
   and train to the end.
4. ``eerpipe evaluate`` on the run's best export, on the held-out test subjects.

The last line is the verdict: ``smoke-gpu: PASS ...`` (steps, sessions/s, val and test EER, wall
time) or ``smoke-gpu: FAIL: <why>`` (exit 1, after the tail of the failing command's output).
Without CUDA it says so and exits 2.

Why the commands' own output is read: the smoke test checks what a user sees, the progress lines
of ``eerpipe train`` (``pipeline/training/progress.py``) and the ``metrics.json`` of ``eerpipe
evaluate``. Planning a run for N GPUs and reading its output are plain functions, so the tests run
this whole flow on the CPU with a few overrides of their own (a small model, fp32, gloo).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml"
RUN_NAME = "smoke-gpu"
SUBJECTS_PER_BATCH = 16  # P per rank (gpu.yaml's K = 8 sessions each): 128 sessions per GPU and step
LOADER_WORKERS = 2  # readers per rank, each given one shard
BATCHES_PER_SHARD = 8  # per epoch: a shard holds this many batches' subjects
EPOCHS = 2
TOTAL_STEPS = EPOCHS * LOADER_WORKERS * BATCHES_PER_SHARD  # 32, on any number of GPUs
STOP_STEP = 20  # in the second epoch, between two checkpoints
EVERY = 10  # steps between validations, checkpoints and logged steps (and at each epoch end)
HELD_OUT = 64  # validation and test subjects each
DEADLINE_S = 450.0  # the whole smoke test, sharding included
PROGRESS = re.compile(  # a progress line of `eerpipe train`, wrapped or not
    r"step\s+(\d+)/(\d+)\s+epoch\s+\d+\s+loss\s+(\S+)\s+val\s+EER\s+(\S+)\s+(\S+)\s+sessions/s"
)


class SmokeFailure(Exception):
    """Why the smoke test failed, in one line: the verdict's."""


@dataclass(frozen=True)
class Progress:
    """One progress line of ``eerpipe train``: the latest values at a reported step."""

    step: int
    total: int
    loss: float
    val_eer: float | None  # fraction; None before the run's first validation
    sessions_per_s: float


@dataclass(frozen=True)
class Outcome:
    """What a passing smoke test reports."""

    gpus: int
    steps: int
    sessions_per_s: float
    val_eer: float
    test_eer: float
    seconds: float

    def verdict(self) -> str:
        return (f"smoke-gpu: PASS {self.steps} steps on {self.gpus} GPU{'s' * (self.gpus > 1)} "
                f"(stopped at {STOP_STEP}, resumed), {self.sessions_per_s:,.0f} sessions/s, "
                f"val EER {100 * self.val_eer:.2f} %, test EER {100 * self.test_eer:.2f} %, {self.seconds:.0f} s")


def training_subjects(gpus: int) -> int:
    """One shard of :data:`BATCHES_PER_SHARD` batches for each reader (GPUs × loader workers)."""
    return gpus * LOADER_WORKERS * BATCHES_PER_SHARD * SUBJECTS_PER_BATCH


def write_corpus(shards: Path, gpus: int) -> None:
    """The synthetic shard set: equal train shards, one per reader, and the held-out subjects."""
    from sharding.writer import write_shards

    write_shards(f"synth:{training_subjects(gpus) + 2 * HELD_OUT}:0", str(shards),
                 subjects_per_shard=BATCHES_PER_SHARD * SUBJECTS_PER_BATCH, val_subjects=HELD_OUT,
                 test_subjects=HELD_OUT, workers=min(8, os.cpu_count() or 1))


def train_overrides(root: Path, gpus: int) -> list[str]:
    """``configs/gpu.yaml`` for this smoke test on ``gpus`` GPUs, its files under ``root``."""
    return [
        f"data.shards={root / 'shards'}", f"run.storage={root / 'runs'}", f"run.name={RUN_NAME}",
        f"train.num_workers={gpus}", "train.precision=bf16", f"data.subjects_per_batch={SUBJECTS_PER_BATCH}",
        f"data.loader_workers={LOADER_WORKERS}", f"train.epochs={EPOCHS}", "train.warmup_steps=5",
        f"train.val_every={EVERY}", f"train.checkpoint_every={EVERY}", f"train.log_every={EVERY}",
        "train.max_failures=0",  # a failure must fail the smoke test, not be retried out of sight
        "wandb.enabled=false",  # nothing to log or sync, and no W&B client needed
    ]


def eerpipe() -> list[str]:
    """The ``eerpipe`` command of this Python's venv, as a user runs it; where the project is
    importable but not installed (a GPU image's own Python), ``python -m pipeline.cli``, the same app."""
    script = Path(sys.executable).with_name("eerpipe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]


def run(arguments: Sequence[str], log: Path, deadline: float) -> str:
    """``eerpipe ARGUMENTS`` in its own process session, output (both streams) to ``log``; returns
    the output. A non-zero exit or the deadline is a :class:`SmokeFailure`; the session's
    processes (Ray's too) are ended either way, so nothing holds a GPU for the next command."""
    command = f"eerpipe {arguments[0]}"
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster, not a remote one
    with log.open("w") as out:
        process = subprocess.Popen([*eerpipe(), *arguments], stdout=out, stderr=subprocess.STDOUT,
                                   env=environment, start_new_session=True)
        try:
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        finally:
            end_session(process)
    if code is None:
        raise SmokeFailure(f"{command} still running at the {DEADLINE_S:.0f} s deadline")
    output = log.read_text(errors="replace")
    if code:
        raise SmokeFailure(f"{command} exited {code}: {last_line(output)}")
    return output


def end_session(process: subprocess.Popen) -> None:
    """End what is left of the process session ``process`` leads (its own Ray cluster)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def progress_of(output: str) -> list[Progress]:
    """Every progress line in ``eerpipe train``'s output, in order."""
    return [
        Progress(int(step), int(total), float(loss), None if val == "–" else float(val.rstrip("%")) / 100,
                 float(rate))
        for step, total, loss, val, rate in PROGRESS.findall(output)
    ]


def check_launch(output: str, first_step: int, last_step: int) -> Progress:
    """The last progress line of a launch that must report from after ``first_step`` (0: from
    the start; a resumed launch must not report a step it had already trained) to ``last_step``,
    with a finite loss throughout."""
    progress = progress_of(output)
    if not progress:
        raise SmokeFailure(f"eerpipe train printed no progress line: {last_line(output)}")
    steps = [p.step for p in progress]
    if steps[0] <= first_step:
        raise SmokeFailure(f"the relaunch reported step {steps[0]}, not after step {first_step}: it did not resume")
    if steps[-1] != last_step or progress[-1].total != last_step:  # the total shown is the launch's stop step
        raise SmokeFailure(f"the launch reported steps {steps} of {progress[-1].total}, expected up to {last_step}")
    if not all(math.isfinite(p.loss) for p in progress):
        raise SmokeFailure(f"a non-finite training loss: {[p.loss for p in progress]}")
    return progress[-1]


def better_than_chance(name: str, eer: float | None) -> float:
    if eer is None or not 0 <= eer < 0.5:
        raise SmokeFailure(f"{name} {eer} is not below chance (50 %)")
    return eer


def smoke(root: Path, gpus: int, overrides: Sequence[str] = ()) -> Outcome:
    """The whole smoke test under ``root`` on ``gpus`` GPUs (``overrides`` after its own); raises
    :class:`SmokeFailure` with the reason."""
    started = time.monotonic()
    deadline = started + DEADLINE_S
    stage(f"sharding {training_subjects(gpus) + 2 * HELD_OUT} synthetic subjects")
    write_corpus(root / "shards", gpus)
    train = ["train", "--config", str(CONFIG), *train_overrides(root, gpus), *overrides]
    stage(f"training on {gpus} GPU{'s' * (gpus > 1)} to step {STOP_STEP} of {TOTAL_STEPS}")
    check_launch(run([*train, f"train.max_steps={STOP_STEP}"], root / "train-1.log", deadline), 0, STOP_STEP)
    stage(f"relaunching {RUN_NAME}: it must resume after step {STOP_STEP}")
    last = check_launch(run(train, root / "train-2.log", deadline), STOP_STEP, TOTAL_STEPS)
    stage("evaluating the best export on the test subjects")
    run(["evaluate", "--checkpoint", str(root / "runs" / RUN_NAME), "--shards", str(root / "shards"),
         "--split", "test", "--out", str(root / "evaluation"), "--quiet"], root / "evaluate.log", deadline)
    report = json.loads((root / "evaluation" / "metrics.json").read_text())
    return Outcome(gpus, last.step, last.sessions_per_s, better_than_chance("val EER", last.val_eer),
                   better_than_chance("test EER", report["global"]["eer"]), time.monotonic() - started)


def stage(text: str) -> None:
    print(f"smoke-gpu: {text}", flush=True)


def failing_output(root: Path, lines: int = 40) -> str:
    """The end of the newest command log: what the failing command said."""
    logs = sorted(root.glob("*.log"), key=lambda path: path.stat().st_mtime)
    return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:]) if logs else ""


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        print("smoke-gpu: no CUDA GPU here; run `make smoke-gpu` on a GPU machine", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory(prefix="smoke-gpu-") as folder:
        root = Path(folder)
        try:
            outcome = smoke(root, torch.cuda.device_count())
        except Exception as failure:  # whatever failed, the last line is the verdict
            print(failing_output(root) if isinstance(failure, SmokeFailure) else traceback.format_exc(),
                  file=sys.stderr, flush=True)
            print(f"smoke-gpu: FAIL: {failure if isinstance(failure, SmokeFailure) else repr(failure)}", flush=True)
            sys.exit(1)
    print(outcome.verdict())


if __name__ == "__main__":
    main()
