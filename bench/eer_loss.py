"""EERLoss forward+backward cost against a plain all-pairs contrastive loss on the same batch.

The contrastive loss is the cheapest loss that looks at every pair of the batch, so the ratio
says what the threshold search costs on top of the pairs themselves. The authors' reference
(an N×N×D broadcast, re-implemented from its description) is timed where it fits in memory.
"""

from __future__ import annotations

import time

import torch

from pipeline.losses import EERLoss

DIM = 256
SESSIONS_PER_SUBJECT = 8


def contrastive_all_pairs(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Hadsell-style contrastive loss over every unordered pair (the reference)."""
    distances = torch.cdist(embeddings, embeddings)
    upper = torch.ones_like(distances, dtype=torch.bool).triu_(1)
    same = labels[:, None] == labels[None, :]
    genuine = distances[same & upper]
    impostor = distances[~same & upper]
    return genuine.pow(2).mean() + (margin - impostor).clamp_min(0).pow(2).mean()


def authors_broadcast_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """How the authors build distances: an N×N×D difference tensor (the cost we avoid)."""
    return (embeddings[:, None, :] - embeddings[None, :, :]).pow(2).sum(-1).clamp_min(1e-12).sqrt()


def seconds(loss_fn, n: int, repeats: int) -> float:
    torch.manual_seed(0)
    x = torch.randn(n, DIM, requires_grad=True)
    labels = torch.arange(n // SESSIONS_PER_SUBJECT).repeat_interleave(SESSIONS_PER_SUBJECT)
    loss_fn(x, labels).backward()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        x.grad = None
        start = time.perf_counter()
        loss_fn(x, labels).backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    eer_loss = EERLoss()
    print(f"EERLoss (area, implicit threshold gradient) vs all-pairs contrastive, D={DIM}, "
          f"{SESSIONS_PER_SUBJECT} sessions/subject, best of runs, fwd+bwd, {torch.get_num_threads()} threads")
    print(f"{'N':>6} {'pairs':>12} {'contrastive s':>14} {'EERLoss s':>10} {'ratio':>6} {'authors dist s':>15}")
    for n, repeats in ((320, 5), (2048, 3), (8192, 1)):
        reference = seconds(contrastive_all_pairs, n, repeats)
        ours = seconds(eer_loss, n, repeats)
        authors = (
            f"{seconds(lambda x, y: authors_broadcast_distances(x).sum(), n, repeats):15.3f}"
            if n <= 2048 else f"{'(N×N×D OOM)':>15}"
        )
        print(f"{n:>6} {n * (n - 1) // 2:>12,} {reference:>14.3f} {ours:>10.3f} {ours / reference:>6.2f} {authors}")


if __name__ == "__main__":
    main()
