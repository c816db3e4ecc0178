"""EERLoss forward+backward against the bare Gram matmul and an all-pairs contrastive loss.

The Gram floor, ``(E @ E.T).sum().backward()``, is what any loss over every pair must at least
pay (the distances of all pairs and their gradient), so the ratio says what the threshold
search, the soft rates and the area terms cost on top of the pairs themselves; the
contrastive loss is the cheapest loss that looks at every pair. Every measurement runs in a
fresh subprocess, which reports its best time and its peak memory: the growth of the
process's peak resident set (``VmHWM``) over its resident set before the first call
(``tracemalloc`` does not see torch's allocations). Time is the measuring process's CPU time,
best of ``repeats`` after one warm-up call (single runs: no warm-up): on a machine shared with
other jobs, wall time measures them too; on one thread and an idle machine the two agree.

Sharded rows (``EERLoss(...)(G, labels, rows=..., group=...)``): W ranks are simulated in
one process. Rank 0 of W holds rows ``[0, N/W)`` and scores the pairs they own; the all-reduce
of the other ranks' partial sums is left out (their sums are taken as zero), which changes
the values but not the work: the per-rank time and peak are those of a real rank minus its
collectives (a few vectors per pass).

Operating points: ``target={"fmr": 0.001}`` and the FMR band ``fmr_band`` (4 targets on
[0.1, 0.4] %) against the default EER target, each as a multiple of the Gram floor; the band's
points share one pass over the pairs and one backward matmul pair, so it should cost about one point.

``python -m bench.eer_loss N`` measures EERLoss alone at one batch size (e.g. 65536).
``EERPIPE_BENCH_THREADS=1`` runs every measurement on one torch thread: on a machine shared with
other jobs, two threads that wait for each other at every op make wall times meaningless.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.losses import EERLoss
from pipeline.losses.eer.collective import _Collective
from pipeline.losses.fmr_band import FMRBandLoss

DIM = 256
SESSIONS_PER_SUBJECT = 8
SIZES = ((2048, 3, True), (8192, 2, True), (32768, 1, False))  # N, repeats, with the contrastive loss
SHARDED = ((8192, 2), (16384, 1))  # global N, repeats
OPERATING_POINTS = ((2048, 5), (8192, 3))  # N, repeats
WORLDS = (1, 2, 4)
THREADS = int(os.environ.get("EERPIPE_BENCH_THREADS", torch.get_num_threads()))


def contrastive_all_pairs(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Hadsell-style contrastive loss over every unordered pair (the reference)."""
    distances = torch.cdist(embeddings, embeddings)
    upper = torch.ones_like(distances, dtype=torch.bool).triu_(1)
    same = labels[:, None] == labels[None, :]
    genuine = distances[same & upper]
    impostor = distances[~same & upper]
    return genuine.pow(2).mean() + (margin - impostor).clamp_min(0).pow(2).mean()


def gram_floor(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The bare Gram matmul every all-pairs loss needs (its sum, so backward is two matmuls)."""
    return (embeddings @ embeddings.T).sum()


def rank_share(world: int, loss: EERLoss | None = None):
    """``loss`` (default ``EERLoss()``) as rank 0 of ``world`` ranks computes it: its rows' pairs, no collectives."""
    loss = loss or EERLoss()

    def share(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = range(0, len(labels) // world)
        return loss._loss(embeddings, labels, False, rows, _Collective())

    return share


def _memory_kb(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of this process, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(kind: str, n: int, repeats: int, world: int = 1) -> None:
    """Runs in the subprocess: time ``kind`` at batch ``n``, print seconds and peak MB as JSON."""
    losses = {
        "gram": lambda: gram_floor,
        "contrastive": lambda: contrastive_all_pairs,
        "eer": lambda: rank_share(world),
        "fmr": lambda: rank_share(world, EERLoss(target={"fmr": 0.001})),
        "band": lambda: rank_share(world, FMRBandLoss(low=0.001, high=0.004, points=4)),
    }
    loss_fn = losses[kind]()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    x = torch.randn(n, DIM, requires_grad=True)
    labels = torch.arange(n // SESSIONS_PER_SUBJECT).repeat_interleave(SESSIONS_PER_SUBJECT)
    resident = _memory_kb("VmRSS")
    best = float("inf")
    for _ in range(repeats + (repeats > 1)):  # the first of several is a warm-up
        x.grad = None
        start = time.process_time()
        loss_fn(x, labels).backward()
        best = min(best, time.process_time() - start)
    print(json.dumps({"seconds": best, "peak_mb": (_memory_kb("VmHWM") - resident) / 1024}))


def measure(kind: str, n: int, repeats: int, world: int = 1) -> tuple[float, float]:
    """(best seconds, peak MB) of one measurement in a fresh subprocess."""
    code = f"from bench.eer_loss import child; child({kind!r}, {n}, {repeats}, {world})"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["seconds"], result["peak_mb"]


def against_the_floor() -> None:
    print(f"EERLoss() (area, implicit) vs the Gram floor and all-pairs contrastive, D={DIM}, "
          f"{SESSIONS_PER_SUBJECT} sessions/subject, fwd+bwd CPU s, {THREADS} threads, peak = RSS growth")
    print(f"{'N':>6} {'pairs':>13} {'Gram s':>7} {'MB':>6} {'EER s':>7} {'MB':>6} {'EER/Gram':>8} "
          f"{'contr. s':>8} {'MB':>6} {'EER/contr.':>10}")
    for n, repeats, with_contrastive in SIZES:
        gram, gram_mb = measure("gram", n, repeats)
        ours, ours_mb = measure("eer", n, repeats)
        row = f"{n:>6} {n * (n - 1) // 2:>13,} {gram:7.3f} {gram_mb:6.0f} {ours:7.3f} {ours_mb:6.0f} {ours / gram:8.2f}"
        if with_contrastive:
            contrastive, contrastive_mb = measure("contrastive", n, repeats)
            row += f" {contrastive:8.3f} {contrastive_mb:6.0f} {ours / contrastive:10.2f}"
        print(row, flush=True)


def sharded() -> None:
    print("\nSharded pairs, per rank (rank 0 of W simulated in one process: its pairs, no collectives)")
    print(f"{'N':>6} {'W':>2} {'rank CPU s':>10} {'MB':>6} {'speed-up':>8}")
    for n, repeats in SHARDED:
        alone = None
        for world in WORLDS:
            seconds, peak_mb = measure("eer", n, repeats, world)
            alone = alone or seconds
            print(f"{n:>6} {world:>2} {seconds:10.3f} {peak_mb:6.0f} {alone / seconds:8.2f}", flush=True)


def operating_points() -> None:
    print("\nOperating points, fwd+bwd as a multiple of the Gram floor: EER target, FMR 0.1 % target, "
          "FMR band [0.1, 0.4] % (4 points)")
    print(f"{'N':>6} {'Gram s':>7} {'EER':>6} {'FMR':>6} {'band':>6} {'band/FMR':>8}")
    for n, repeats in OPERATING_POINTS:
        gram, _ = measure("gram", n, repeats)
        eer, fmr, band = (measure(kind, n, repeats)[0] for kind in ("eer", "fmr", "band"))
        ratios = f"{eer / gram:6.2f} {fmr / gram:6.2f} {band / gram:6.2f} {band / fmr:8.2f}"
        print(f"{n:>6} {gram:7.3f} {ratios}", flush=True)


def main(argv: list[str] | None = None) -> None:
    if argv:
        for n in map(int, argv):
            seconds, peak_mb = measure("eer", n, 1)
            print(f"EERLoss() N={n}: {seconds:.1f} CPU s fwd+bwd ({THREADS} threads), "
                  f"peak {peak_mb:.0f} MB above the inputs")
        return
    against_the_floor()
    sharded()
    operating_points()


if __name__ == "__main__":
    main(sys.argv[1:])
