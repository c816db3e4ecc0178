"""Where each block's few genuine pairs lie in its band, found from the sorted labels.

Why: a band is almost all impostors (a subject's few sessions against the whole batch), so the
passes over the pairs never build a mask. They sum a term over the whole band as if every pair
were an impostor and then take the genuine pairs' share back out; only the genuine pairs need
locating, and a binary search per label in the sorted labels finds them without comparing labels
over the bands. The search runs for all of a process's rows at once and is split by block
afterwards: how many pairs a block holds is data, so a search per block would make the host wait
for the device once per block (the package doc's "Host waits").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.losses.eer.slabs import _Block

Where = tuple[torch.Tensor, torch.Tensor]  # (rows, columns) of some pairs in a block's band


def _same_label(labels: torch.Tensor, pool: tuple[torch.Tensor, torch.Tensor]) -> Where:
    """Every ``(i, j)`` where ``labels[i]`` is the label of item ``j`` of a pool, given the pool's
    labels sorted and their positions (``torch.sort``): a binary search per label."""
    sorted_labels, positions = pool
    first = torch.searchsorted(sorted_labels, labels)
    counts = torch.searchsorted(sorted_labels, labels, right=True) - first
    rows = torch.repeat_interleave(torch.arange(len(labels), device=labels.device), counts)
    shift = first - (counts.cumsum(0) - counts)  # from a match's output index to its sorted position
    return rows, positions[torch.arange(len(rows), device=labels.device) + shift[rows]]


def _by_block(
    blocks: Sequence[_Block], rows: torch.Tensor, columns: torch.Tensor, stride: int, owned: torch.Tensor | None = None
) -> list[Where]:
    """The pairs (row ``blocks[0].a + rows``, ``columns``), those ``owned`` (default: all), as each
    block's (rows, columns) in its band, in row-major order.

    The blocks tile the plane of (row, column) in row-major order — ranges of rows over every
    column, or single rows cut into column ranges (a memory wider than a block) — so, sorted by
    ``row·stride + column``, each block's pairs are one run in its band's order, and where the
    runs start is one search for the blocks' first keys (copied over, read back once).
    """
    first = blocks[0].a
    end = (blocks[-1].b - first) * stride  # beyond every key: where the pairs not owned sort
    keys = rows * stride + columns
    keys, order = torch.sort(keys if owned is None else torch.where(owned, keys, end))
    starts = [(block.a - first) * stride + block.first_column for block in blocks]
    bounds = torch.searchsorted(keys, keys.new_tensor([*starts, end])).tolist()
    runs = [order[start:stop] for start, stop in zip(bounds, bounds[1:])]
    return [
        (rows[run] - (block.a - first), columns[run] - block.first_column)
        for block, run in zip(blocks, runs, strict=True)
    ]


def _without(band: torch.Tensor, where: Where) -> torch.Tensor:
    """The band's distances except those at ``where``, in row-major order.

    By index, not by a boolean mask, whose selection would read its size on the host: with ``p_j``
    the removed positions in order, the ``k``-th kept distance is at ``k + #{j : p_j − j ≤ k}``.
    """
    removed = where[0] * band.shape[1] + where[1]
    kept = torch.arange(band.numel() - len(removed), device=band.device)
    before = torch.searchsorted(removed - torch.arange(len(removed), device=band.device), kept, right=True)
    return band.reshape(-1)[kept + before]
