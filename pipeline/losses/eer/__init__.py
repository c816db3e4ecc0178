"""EERLoss: a smooth, arbitrarily accurate surrogate of a batch's Equal Error Rate, or of any DET
operating point (FNMR at a target FMR, FMR at a target FNMR).

The definitions it reproduces (the soft error rates, the soft search for the threshold, the
direct and the area loss) and what was measured with them: docs/design.md, section "EERLoss";
the cross-batch memory and the persistent threshold have their own sections there. One concern
per module, in the order they build on each other:

- ``slabs``: a row block's slab of the Gram matrix — its distances, and its gradient back by two
  matmuls (never an ``N × N × D`` tensor);
- ``genuine_pairs``: where each block's few genuine pairs lie, found from the sorted labels;
- ``collective``: this process's partial sums over pairs made global across ranks;
- ``pairs``: which pairs this process scores (row blocks, skewed bands, chunks, memory slabs,
  shares of sharded ranks) and the passes of sums over them;
- ``soft_terms``: the per-pair soft step and area term, and their derivatives;
- ``autograd``: the sums over pairs as one differentiable function, with a hand-written backward;
- ``threshold``: the threshold search (bisection or unrolled), its implicit gradient, and the
  persistent threshold;
- ``loss``: ``EERLoss`` itself.

Host waits: on a GPU the host queues kernels ahead of the device until it needs a value from it
(``.item()``, ``float(t)``, ``.tolist()``, a blocking copy, the size of a boolean selection,
``bincount``'s length); each such read waits for everything queued so far. A default forward and
backward pass wait six times on a GPU (the CPU profiler, which sees the scalar reads only, counts
three), whatever N and however many blocks and chunks (a memory adds three,
sharding two, an unrolled search two per step): the genuine pairs of all blocks are found at once,
the search grid's size is read once, and the thresholds once before the pass of sums and once
before backward. The search keeps ``d`` on the device, histograms add into a counts vector
(``index_add_``), and the pair counts and target rates reach the device as fills, not copies.
``return_stats`` reads its floats on top (logged steps only). Counted on the CPU by
``tests/test_eer_host_syncs.py``.
"""

from pipeline.losses.eer.loss import EERLoss, EERStats, Target
from pipeline.losses.eer.pairs import Memory, pair_distances
from pipeline.losses.eer.threshold import RunningThreshold

__all__ = ["EERLoss", "EERStats", "Memory", "RunningThreshold", "Target", "pair_distances"]
