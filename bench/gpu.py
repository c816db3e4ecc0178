"""The numbers a GPU cluster user needs, measured on one GPU: ``make bench-gpu``.

1. **Model**: Type2Branch-large forward + backward (EERLoss on top) under bf16 autocast at
   ``configs/gpu.yaml``'s per-rank batch (64 subjects × 8 sessions of 100 keys): sessions/s
   per GPU, which sizes the cluster and the loader.
2. **Loss**: EERLoss forward + backward (the blocked code path every rank runs; with pair
   sharding a rank of W scores about 1/W of these pairs) at N up to 65,536 embeddings of
   D = 256, time and peak GPU memory, against the Gram floor ``(E @ E.T).sum().backward()``
   at the same N in the same run: what the loss adds to the pairs any all-pairs loss pays.
3. **Loader**: sessions/s of the subject-aware loader with 1, 4 and 8 worker processes on
   local synthetic shards, against the model's rate: a GPU must never wait on data.

Without CUDA it says so and exits 2: on a CPU these numbers mean nothing (``make bench`` has
the CPU ones). Every measuring function takes the device and the sizes, so the tests run them
on the CPU at toy sizes.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import torch

from pipeline.data import Batch, SamplerConfig, SubjectBatchLoader
from pipeline.losses.eer import EERLoss
from pipeline.models import build_model
from sharding.writer import write_shards

P, K, LENGTH = 64, 8, 100  # configs/gpu.yaml, per rank
DIM = 256
LOSS_SIZES = (4_096, 16_384, 65_536)
LOADER_WORKERS = (1, 4, 8)
SUBJECTS, SHARD_SIZE, HELD_OUT = 2_048, 128, 64  # synthetic train subjects, per shard, val and test each


def timed(step: Callable[[], None], device: torch.device, repeats: int) -> tuple[float, float]:
    """(best seconds, peak GB above the memory held before) of ``step`` after one warm-up call;
    the peak is GPU memory on CUDA and NaN elsewhere (a CPU process's peak is not per call)."""
    step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - held) / 2**30 if cuda else math.nan
    return best, peak


def model_rate(batch: Batch, device: torch.device, size: str = "large", repeats: int = 3) -> float:
    """Sessions/s of Type2Branch forward + backward with EERLoss, bf16 autocast, on ``batch``."""
    model, loss = build_model("type2branch", size=size).to(device), EERLoss()
    features, mask, labels = batch.features.to(device), batch.mask.to(device), batch.labels.to(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            embeddings = model(features, mask)
        loss(embeddings, labels).backward()

    seconds, _ = timed(step, device, repeats)
    return len(labels) / seconds


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

    return {name: timed(step(loss), device, repeats) for name, loss in losses.items()}


def loader_rates(
    root: str, workers: Sequence[int], batches: int, subjects: int = P, sessions: int = K
) -> tuple[dict[int, float], Batch]:
    """Sessions/s over the first ``batches`` batches with each worker count, and the last batch."""
    rates, last = {}, None
    for count in workers:
        loader = SubjectBatchLoader(
            root, config=SamplerConfig(subjects_per_batch=subjects, sessions_per_subject=sessions, max_len=LENGTH),
            rank=0, world_size=1, num_workers=count,
        )
        start, taken = time.perf_counter(), 0
        for last in loader:
            taken += 1
            if taken == batches:
                break
        if not taken:
            raise ValueError(f"{root}: the shard set yields no {subjects} × {sessions} batch")
        rates[count] = taken * subjects * sessions / (time.perf_counter() - start)
    return rates, last


def main() -> None:
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here; run `make bench-gpu` on a GPU machine "
              "(`make bench` has the CPU benchmarks)", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as root:
        write_shards(f"synth:{SUBJECTS + 2 * HELD_OUT}:0", root, subjects_per_shard=SHARD_SIZE,
                     val_subjects=HELD_OUT, test_subjects=HELD_OUT)
        loading, batch = loader_rates(root, LOADER_WORKERS, batches=SUBJECTS // P)
    model = model_rate(batch, device)
    print(f"\ntype2branch large fwd+bwd + EERLoss, bf16 autocast, P×K = {P}×{K}, length {LENGTH}: "
          f"{model:,.0f} sessions/s per GPU")
    print(f"\n{'loader workers':>14} {'sessions/s':>11} {'loader / model':>15}")
    for count, rate in loading.items():
        print(f"{count:>14} {rate:>11,.0f} {rate / model:>15.2f}")
    print(f"\nEERLoss() vs the Gram floor, D = {DIM}, fwd+bwd, peak = GPU memory above the inputs")
    print(f"{'N':>6} {'pairs':>13} {'Gram s':>8} {'GB':>6} {'EER s':>8} {'GB':>6} {'EER/Gram':>8}")
    for n in LOSS_SIZES:
        cost = loss_cost(n, device)
        (gram, gram_gb), (eer, eer_gb) = cost["gram"], cost["eer"]
        print(f"{n:>6} {n * (n - 1) // 2:>13,} {gram:8.4f} {gram_gb:6.2f} {eer:8.4f} {eer_gb:6.2f} {eer / gram:8.2f}",
              flush=True)


if __name__ == "__main__":
    main()
