"""Where one process's partial sums over pairs become the global ones: a process group, or nothing.

Why: with ``rows=`` each rank scores only the pairs its rows own, and everything the loss needs
is a sum (or a min, a max) over pairs. All-reducing those sums — the distance range, the pair
counts, the histograms, the rates, their slopes, the area and distance sums; small batches
all-gather their exact distances instead — makes the threshold, the loss value and the stats
identical on every rank. A loss that is not sharded pays nothing: its "reduction" is the
identity and its counts stay on the host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _Collective:
    """Where this process's partial sums over pairs become global ones: a process group or nothing."""

    def __init__(self, group: dist.ProcessGroup | None = None, sharded: bool = False) -> None:
        self.group, self.sharded = group, sharded
        self.world = dist.get_world_size(group) if sharded else 1

    def reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """``tensor`` all-reduced in place (sum, min or max over ranks)."""
        if self.sharded:
            dist.all_reduce(tensor, op, group=self.group)
        return tensor

    def total(self, counts: list[int], device: torch.device) -> tuple[int, ...]:
        """``counts`` summed over ranks; kept on the host when there is one rank (no device round trip)."""
        if not self.sharded:
            return tuple(counts)
        return tuple(self.reduce(torch.tensor(counts, dtype=torch.int64, device=device)).tolist())

    def concat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D ``tensor``, concatenated in rank order (lengths may differ)."""
        if not self.sharded:
            return tensor
        size = tensor.new_full((1,), tensor.numel(), dtype=torch.int64)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self.group)
        lengths = torch.cat(sizes).tolist()  # one read of every rank's length
        padded = torch.cat([tensor, tensor.new_zeros(max(lengths) - tensor.numel())])
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:length] for part, length in zip(parts, lengths, strict=True)])
