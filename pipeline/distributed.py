"""Where the loss sees global pairs: all-gather embeddings and labels across ranks, with gradients.

A pairwise loss such as EERLoss improves as the batch grows, so every rank scores every
genuine and impostor pair of the *global* batch, not only of its local rows.

Why the parameter gradients are exact
-------------------------------------
Let rank r hold n_r rows, W ranks, and L(G) the loss of the gathered global batch G.

1. Forward: every rank gathers the same G (rank order, padding removed) and computes the
   same L(G).
2. Backward: ``all_gather_single_autograd`` differentiates to a sum reduce-scatter (torch
   2.13: ``_functional_collectives.all_gather_into_tensor_backward`` calls
   ``reduce_scatter_tensor(grad, "sum", ...)``; ``all_gather_tensor_autograd`` is a
   deprecated alias). Every rank holds the same dL/dG, so rank r's local rows receive the
   sum over W ranks of dL/dG_r, i.e. W * dL/dG_r, and its parameter gradient is W times the
   share of dL/dtheta that flows through its own rows.
3. Data-parallel averaging (DDP, DeepSpeed: all-reduce then divide by W) sums these shares
   over ranks and divides by W: the result is dL/dtheta of one process holding the global
   batch. Only the floating-point summation order differs.

This holds for per-sample models; a layer that mixes rows (BatchNorm in training mode) sees
only its local rows unless it is synchronised.

Two rules keep the pairs honest: the output never contains a rank's local rows twice (local
rows concatenated with gathered rows would pair a sample with itself as a fake genuine
pair), and labels are gathered in the same order. Collectives need equal shapes on every
rank, so uneven local batches are padded to the largest, gathered, and the padding rows are
dropped again. Its running statistics drift apart across ranks, too, so eval-mode embedding
first gives every rank rank 0's (:func:`use_rank0_buffers`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as funcol


def world_size() -> int:
    """Ranks of the default process group; 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def use_rank0_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics), in place.

    Why: DeepSpeed broadcasts parameters once, at the start, and never buffers; each rank then
    updates its running statistics from its own batches, so the ranks' models drift apart in
    eval mode. Rank 0's model is the one checkpointed and exported, so every rank must embed its
    share of the validation split (and the hard batches' centroids) with rank 0's buffers for the
    metric that picks the best export to be that export's. Training steps are unaffected: in
    train mode BatchNorm normalises with batch statistics. Every rank must call it (a collective).
    """
    if world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


class GatheredBatch(NamedTuple):
    """The global batch every rank holds after the gather, and where this rank's rows sit in it."""

    embeddings: torch.Tensor  # [N, D], rows in rank order
    labels: torch.Tensor  # [N]
    rows: range  # this rank's own rows: what a pair-sharded loss scores against the batch


def gather_embeddings(
    embeddings: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather ``embeddings [n, D]`` (with gradient) and ``labels [n]`` from every rank.

    Returns ``(global_embeddings [N, D], global_labels [N])`` with N the sum of the local
    sizes, rows in rank order. Every rank must call it (it is a collective). With one rank,
    or no process group, the inputs come back unchanged.
    """
    gathered = gather_batch(embeddings, labels)
    return gathered.embeddings, gathered.labels


def gather_batch(embeddings: torch.Tensor, labels: torch.Tensor) -> GatheredBatch:
    """:func:`gather_embeddings`, also telling this rank's rows in the global batch."""
    if embeddings.dim() != 2 or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"expected embeddings [n, D] and labels [n], got {tuple(embeddings.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if world_size() == 1:
        return GatheredBatch(embeddings, labels, range(len(labels)))
    group = dist.group.WORLD
    assert group is not None  # initialised: world_size() > 1
    local = torch.tensor([embeddings.shape[0]], device=embeddings.device)
    sizes = funcol.all_gather_single(local, 0, group).tolist()
    longest = max(sizes)
    keep = torch.cat(
        [torch.arange(size, device=embeddings.device) + r * longest for r, size in enumerate(sizes)]
    )
    padding = longest - embeddings.shape[0]
    padded = torch.cat([embeddings, embeddings.new_zeros(padding, embeddings.shape[1])])
    padded_labels = torch.cat([labels, labels.new_zeros(padding)])
    gathered = funcol.all_gather_single_autograd(padded, 0, group)
    gathered_labels = funcol.all_gather_single(padded_labels, 0, group)
    start = sum(sizes[: dist.get_rank(group)])
    return GatheredBatch(gathered[keep], gathered_labels[keep], range(start, start + embeddings.shape[0]))
