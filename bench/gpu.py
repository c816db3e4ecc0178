"""The numbers a GPU cluster user sizes a job with, measured on one GPU: ``make bench-gpu``.

1. **Training step**: the DeepSpeed engine that ``configs/gpu.yaml`` trains with (Type2Branch-large,
   EERLoss, ZeRO-1, fp32 master weights with the forward under bf16 autocast), on one rank of a
   local process group (NCCL): batch copied to the device, forward, gather + loss, backward,
   optimizer step, each phase ending with a CUDA synchronisation (``pipeline/training/clock.py``),
   at per-rank batches from gpu.yaml's 512 sessions to 8,192. Sessions/s per GPU, the split, and
   peak GPU memory (weights and Adam states included: what must fit in the card).
2. **Loader**: sessions/s of the subject-aware loader with 1, 4 and 8 worker processes on local
   synthetic shards, against the step's rate at gpu.yaml's batch: a GPU must never wait on data.
3. **Loss**: EERLoss forward + backward (the blocked code path every rank runs; with pair sharding
   a rank of W scores about 1/W of these pairs) at N up to 65,536 embeddings of D = 256 (8 GPUs ×
   8,192), against the Gram floor ``(E @ E.T).sum().backward()`` at the same N in the same run.

Every row is a warm-up call and a few timed ones (best kept). The whole run must end within 8
minutes on one H100, whatever the sizes turn out to cost, so the step and loss sections each have
a time budget: a row whose cost, extrapolated from the row before, does not fit is skipped and
says so; the first size that runs out of GPU memory ends its section, saying so.

Without CUDA it says so and exits 2: on a CPU these numbers mean nothing (``make bench`` has the
CPU ones). Every measuring function takes the device and the sizes, so the tests run them, the
DeepSpeed step included, on the CPU at toy sizes.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from common.loopback import free_port
from pipeline.config import TrainConfig
from pipeline.data import Batch, SamplerConfig, SubjectBatchLoader
from pipeline.losses.eer import EERLoss
from pipeline.training.clock import clock
from sharding.writer import write_shards

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml"
K, LENGTH = 8, 100  # sessions per subject and keys per session, as configs/gpu.yaml
DIM = 256
STEP_SUBJECTS = (64, 256, 512, 1_024)  # P per rank: 512 (gpu.yaml) … 8,192 sessions
LOSS_SIZES = (4_096, 8_192, 16_384, 32_768, 65_536)
LOADER_WORKERS = (1, 4, 8)
SUBJECTS, SHARD_SIZE, HELD_OUT = 2_048, 128, 64  # synthetic train subjects, per shard, val and test each
STEP_BUDGET_S, LOSS_BUDGET_S = 180.0, 180.0
STEP_PHASES = ("copy", "forward", "gather_loss", "backward", "optimizer")


class Budget:
    """The seconds a section may still spend; it refuses a row whose estimated cost does not fit,
    so that an unexpectedly slow size costs a line, not the whole run's time limit."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def timed(step: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float, Any]:
    """(best seconds, peak GB, that call's result) of ``step`` after one warm-up call. Peak: GPU
    memory allocated during the calls above what was held before them (NaN on a CPU, whose
    process peak is not per call)."""
    step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    best, best_result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = step()
        if cuda:
            torch.cuda.synchronize(device)
        if (seconds := time.perf_counter() - start) < best:
            best, best_result = seconds, result
    peak = (torch.cuda.max_memory_allocated(device) - held) / 2**30 if cuda else math.nan
    return best, peak, best_result


def affordable_rows(
    sizes: Sequence[int], budget: Budget, calls: int, growth: float, measure: Callable[[int], float]
) -> Iterator[tuple[int, str | None]]:
    """Run ``measure(size)`` (seconds per call) over ``sizes`` in increasing order; yield each size
    with ``None``, or with why it was not measured. A size is skipped when ``calls`` calls of it,
    extrapolated from the last measured size as ``size ** growth``, would overrun ``budget``; the
    first out-of-memory size ends the section (larger ones would run out too)."""
    last: tuple[int, float] | None = None
    for index, size in enumerate(sizes):
        estimate = calls * last[1] * (size / last[0]) ** growth if last else 0.0
        if estimate > budget.left():
            yield size, f"skipped: ~{estimate:.0f} s, {max(budget.left(), 0):.0f} s of the budget left"
            continue
        try:
            last = size, measure(size)
        except torch.OutOfMemoryError:
            pass  # freed below, once the handler's traceback no longer holds the call's tensors
        else:
            yield size, None
            continue
        free_device_memory()
        for larger in sizes[index:]:
            yield larger, "out of GPU memory" if larger == size else f"skipped: {size:,} ran out of GPU memory"
        return


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_config(overrides: Sequence[str] = ()) -> TrainConfig:
    """``configs/gpu.yaml`` on one rank, plus ``overrides``."""
    return TrainConfig.load(CONFIG, ["train.num_workers=1", *overrides])


def single_rank_group() -> None:
    """The environment DeepSpeed reads to start a one-rank process group on this machine (it picks
    NCCL on CUDA); values already set win, so a caller may choose its own."""
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)


def step_engine(config: TrainConfig, subjects: int) -> Any:
    """The DeepSpeed engine a training worker builds for ``config`` (``build_engine``), on one rank;
    ``subjects``: the training split's, which sizes class-based losses."""
    from pipeline.training.components import build_criterion, build_run_model
    from pipeline.training.engine import build_engine
    from pipeline.training.schedule import Schedule

    single_rank_group()
    return build_engine(config, 1, Schedule(1, 1, 1), build_run_model(config), build_criterion(config, subjects))


def training_step(engine: Any, batch: Batch) -> dict[str, float]:
    """One step as a worker runs it (``pipeline/training/worker.py``), every phase waiting for the
    device at its end: seconds of each of :data:`STEP_PHASES`."""
    device = torch.device(engine.device)
    start = clock(device)
    batch = batch.to(device, non_blocking=True)
    copied = clock(device)
    loss, _ = engine(batch.features, batch.mask, batch.labels, wait_for=device)
    modelled = clock(device)
    engine.backward(loss)
    backward = clock(device)
    engine.step()
    end = clock(device)
    return {"copy": copied - start, "forward": engine.module.timings["forward"],
            "gather_loss": engine.module.timings["gather_loss"], "backward": backward - modelled,
            "optimizer": end - backward}


def step_row(engine: Any, batch: Batch, repeats: int = 3) -> dict[str, float]:
    """Sessions/s, the split of the fastest step and the peak GB of :func:`training_step` on ``batch``
    (the timed steps' peak, weights and optimizer states included)."""
    device = torch.device(engine.device)
    seconds, _, phases = timed(lambda: training_step(engine, batch), device, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan  # all of it
    return {"sessions_per_s": len(batch.labels) / seconds, "step_s": seconds, "peak_gb": peak, **phases}


def loss_cost(n: int, device: torch.device, repeats: int = 3) -> dict[str, tuple[float, float]]:
    """``{"gram": (s, GB), "eer": (s, GB)}``: forward + backward at ``n`` embeddings of ``DIM``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, DIM, generator=generator).to(device).requires_grad_()
    labels = torch.arange(n // K, device=device).repeat_interleave(K)
    eer = EERLoss()
    losses = {"gram": lambda: (x @ x.T).sum(), "eer": lambda: eer(x, labels)}

    def step(loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            loss().backward()
        return run

    return {name: timed(step(loss), device, repeats)[:2] for name, loss in losses.items()}


def batch_loader(root: str, subjects: int, workers: int) -> SubjectBatchLoader:
    """This one-rank machine's loader of ``subjects`` × :data:`K` batches over the shards in ``root``."""
    return SubjectBatchLoader(
        root, config=SamplerConfig(subjects_per_batch=subjects, sessions_per_subject=K, max_len=LENGTH),
        rank=0, world_size=1, num_workers=workers,
    )


def first_batch(root: str, subjects: int) -> Batch:
    """A real training batch of ``subjects`` × :data:`K` sessions."""
    return next(iter(batch_loader(root, subjects, workers=0)))


def loader_rates(root: str, workers: Sequence[int], batches: int, subjects: int) -> dict[int, float]:
    """Sessions/s over the first ``batches`` batches of ``subjects`` × :data:`K` with each worker count."""
    rates = {}
    for count in workers:
        start, taken = time.perf_counter(), 0
        for _ in batch_loader(root, subjects, count):
            taken += 1
            if taken == batches:
                break
        if not taken:
            raise ValueError(f"{root}: the shard set yields no {subjects} × {K} batch")
        rates[count] = taken * subjects * K / (time.perf_counter() - start)
    return rates


def step_table(shards: str, config: TrainConfig) -> dict[int, dict[str, float]]:
    """:func:`step_row` at every affordable size of :data:`STEP_SUBJECTS`, printed as it goes."""
    engine = step_engine(config, SUBJECTS)
    print(f"\ntraining step: {config.model.name} {config.model.options}, {config.loss.name} loss, "
          f"ZeRO-{config.train.zero_stage}, {config.train.precision} autocast, one rank; "
          "peak = GPU memory incl. weights and optimizer")
    print(f"{'sessions':>8} {'sessions/s':>11} {'step s':>7} " + " ".join(f"{p:>11}" for p in STEP_PHASES)
          + f" {'peak GB':>8}")
    rows = {}

    def measure(subjects: int) -> float:
        row = step_row(engine, first_batch(shards, subjects))
        rows[subjects * K] = row
        return row["step_s"]

    for subjects, reason in affordable_rows(STEP_SUBJECTS, Budget(STEP_BUDGET_S), 4, 1.0, measure):
        if reason:
            print(f"{subjects * K:>8} {reason}", flush=True)
            continue
        row = rows[subjects * K]
        print(f"{subjects * K:>8} {row['sessions_per_s']:>11,.0f} {row['step_s']:>7.3f} "
              + " ".join(f"{row[p]:>11.4f}" for p in STEP_PHASES) + f" {row['peak_gb']:>8.2f}", flush=True)
    return rows


def loss_table(device: torch.device) -> None:
    """:func:`loss_cost` at every affordable size of :data:`LOSS_SIZES`, printed as it goes."""
    print(f"\nEERLoss() vs the Gram floor, D = {DIM}, fwd+bwd, peak = GPU memory above the inputs")
    print(f"{'N':>6} {'pairs':>13} {'Gram s':>8} {'GB':>6} {'EER s':>8} {'GB':>6} {'EER/Gram':>8}")
    costs = {}

    def measure(n: int) -> float:
        costs[n] = loss_cost(n, device)
        return costs[n]["gram"][0] + costs[n]["eer"][0]

    for n, reason in affordable_rows(LOSS_SIZES, Budget(LOSS_BUDGET_S), 4, 2.0, measure):
        if reason:
            print(f"{n:>6} {reason}", flush=True)
            continue
        (gram, gram_gb), (eer, eer_gb) = costs[n]["gram"], costs[n]["eer"]
        print(f"{n:>6} {n * (n - 1) // 2:>13,} {gram:8.4f} {gram_gb:6.2f} {eer:8.4f} {eer_gb:6.2f} "
              f"{eer / gram:8.2f}", flush=True)


def loader_table(shards: str, subjects: int, step_rate: float) -> None:
    """:func:`loader_rates` at gpu.yaml's batch, against the training step's ``step_rate``."""
    rates = loader_rates(shards, LOADER_WORKERS, batches=SUBJECTS // subjects, subjects=subjects)
    print(f"\nloader, P×K = {subjects}×{K}, against the training step's {step_rate:,.0f} sessions/s")
    print(f"{'loader workers':>14} {'sessions/s':>11} {'loader / step':>14}")
    for count, rate in rates.items():
        print(f"{count:>14} {rate:>11,.0f} {rate / step_rate:>14.2f}", flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here; run `make bench-gpu` on a GPU machine "
              "(`make bench` has the CPU benchmarks)", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    config = gpu_config()
    subjects = config.data.subjects_per_batch
    with tempfile.TemporaryDirectory() as shards:
        write_shards(f"synth:{SUBJECTS + 2 * HELD_OUT}:0", shards, subjects_per_shard=SHARD_SIZE,
                     val_subjects=HELD_OUT, test_subjects=HELD_OUT, workers=4)
        steps = step_table(shards, config)
        free_device_memory()  # the step's engine, gone with step_table's frame, before the loss table
        loader_table(shards, subjects, steps.get(subjects * K, {}).get("sessions_per_s", math.nan))
    loss_table(device)


if __name__ == "__main__":
    main()
