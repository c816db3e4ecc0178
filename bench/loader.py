"""Loader throughput against what the model consumes, measured in the same run.

    python -m bench.loader

One process reads local shards (the synthetic KVC corpus, written by ``sharding.writer``) into
P×K = 64×8 batches of length-100 sessions (read, verify, parse, draw, decode, featurise); the
reference is Type2Branch-small forward+backward (EERLoss on top) on sessions of such a batch.
The loader must be ≥ 10× faster than the model, per process, so a step never waits on data.
A full 512-session model step takes minutes on a 2-core CPU, so the model is timed on a slice
of 8 subjects (64 sessions); per session a larger batch is, if anything, faster on a CPU, which
would lower the ratio by that margin — the measured ratio is three orders of magnitude above 10.
"""

from __future__ import annotations

import tempfile
import time

import torch

from pipeline.data import Batch, SamplerConfig, SubjectBatchLoader
from pipeline.losses.eer import EERLoss
from pipeline.models import build_model, count_parameters
from sharding.writer import write_shards

P, K, LENGTH = 64, 8, 100
SUBJECTS, SHARD_SIZE, HELD_OUT = 2_048, 256, 64  # train subjects, per shard, val and test each
MODEL_SUBJECTS, MODEL_STEPS = 8, 1


def loader_rate(root: str) -> tuple[float, int, Batch]:
    """Sessions per second over one epoch (buffer warm-up included), the batches, the last one."""
    loader = SubjectBatchLoader(
        root, config=SamplerConfig(subjects_per_batch=P, sessions_per_subject=K, max_len=LENGTH),
        rank=0, world_size=1,
    )
    start = time.perf_counter()
    batches = list(loader)
    return len(batches) * P * K / (time.perf_counter() - start), len(batches), batches[-1]


def model_rate(batch: Batch) -> float:
    """Sessions per second of Type2Branch-small forward+backward (best step after a warm-up)."""
    model, loss = build_model("type2branch", size="small"), EERLoss()
    rows = slice(0, MODEL_SUBJECTS * K)  # subject-major rows: whole subjects
    features, mask, labels = batch.features[rows], batch.mask[rows], batch.labels[rows]
    best = float("inf")
    for step in range(MODEL_STEPS + 1):
        model.zero_grad()
        start = time.perf_counter()
        loss(model(features, mask), labels).backward()
        if step:  # the first step pays one-time allocations
            best = min(best, time.perf_counter() - start)
    return MODEL_SUBJECTS * K / best


def main() -> None:
    torch.manual_seed(0)
    with torch.device("meta"):  # counting needs shapes only
        models = {
            "type2branch small": build_model("type2branch", size="small"),
            "type2branch large": build_model("type2branch", size="large"),
            "typenet": build_model("typenet"),
            "transformer": build_model("transformer"),
        }
    counts = (f"{name} {count_parameters(model) / 1e6:.2f} M" for name, model in models.items())
    print("parameters: " + ", ".join(counts))
    with tempfile.TemporaryDirectory() as root:
        write_shards(f"synth:{SUBJECTS + 2 * HELD_OUT}:0", root, subjects_per_shard=SHARD_SIZE,
                     val_subjects=HELD_OUT, test_subjects=HELD_OUT)
        loading, batches, batch = loader_rate(root)
    training = model_rate(batch)
    print(f"P×K = {P}×{K}, length {LENGTH}, {torch.get_num_threads()} torch threads, one process; loader: "
          f"{batches} batches from {SUBJECTS} subjects in {SUBJECTS // SHARD_SIZE} local shards")
    print(f"{'':<40} {'sessions/s':>12}")
    print(f"{'loader (read, decode, sample, featurise)':<40} {loading:>12,.0f}")
    print(f"{f'type2branch small fwd+bwd ({MODEL_SUBJECTS * K} rows)':<40} {training:>12,.1f}")
    print(f"{'ratio loader / model (need ≥ 10)':<40} {loading / training:>12.1f}")


if __name__ == "__main__":
    main()
