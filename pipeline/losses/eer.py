"""EERLoss: a smooth, arbitrarily accurate surrogate of a batch's Equal Error Rate.

For a batch of embeddings, every unordered pair of samples is either *genuine* (same label,
distances ``L``) or *impostor* (different labels, distances ``I``). With sharpness ``k``:

    FRR_s(d) = mean_L tanh(k · max(0, ℓ − d))      soft false-reject rate at threshold d
    FAR_s(d) = mean_I tanh(k · max(0, d − i))      soft false-accept rate at threshold d

A search finds the threshold ``d*`` of the requested DET operating point — the root of

    target="eer"            FRR_s(d) = FAR_s(d)
    target={"fmr": t}       FAR_s(d) = t        (we then minimise the FNMR there)
    target={"fnmr": t}      FRR_s(d) = t        (we then minimise the FMR there)

and the loss is evaluated at ``d*``:

    variant="direct"   EER target: (FAR_s + FRR_s)/2;  FMR target: FRR_s;  FNMR target: FAR_s
    variant="area"     100 · [ P_β( max(ε, (ℓ − (1−α)d*)/d*) ) + P_β( max(ε, ((1+α)d* − i)/d*) ) ]
                       with the power mean P_β(x) = (mean x^β)^(1/β); an FMR target keeps only the
                       genuine term, an FNMR target only the impostor term (``both_sides=True``
                       keeps both: the pairs on the wrong side of d* move whichever side they are).

Both are in percent, as in the authors' code. As ``k`` and the search precision grow, the direct
EER loss converges to the exact EER of the batch (tested to 0.1 percentage points).

How the gradient reaches the threshold (``threshold_grad``):

* ``"implicit"`` (default): the search runs without autograd, on a fine histogram of the pair
  distances when the batch has many pairs (one pass over them instead of one per step); then ``d*`` is given the exact
  gradient of the root by the implicit-function theorem, ``∂d*/∂θ = −(∂F/∂θ)/(∂F/∂d)`` with
  ``F = a(d) − b(d)`` the search equation (``∂F/∂d`` holds no target rate: before the pairs were
  blocked, an FMR/FNMR target's rate was wrongly kept in it). Cost: one forward and one backward pass over the pairs.
* ``"unrolled"``: the authors' smooth binary search (``l = 0.5·mean L``, ``r = 1.5·mean I``,
  soft moves ``c = exp(k·(rate − max))`` on percent rates), differentiated step by step: one
  forward and one backward pass over the (blocked, shardable) pairs per step.
* ``"detached"``: ``d*`` is a constant; only the pairs move.

Recipe options (issue 8, measured in ``docs/research-notes.md``):

* ``normalize=True`` (default) L2-normalises the embeddings before the distance, as the
  pytorch-metric-learning triplet baselines do: pair distances then live in ``[0, 2]``, so ``k``
  has a fixed meaning relative to them instead of drifting with the embedding norm. It trained
  to a lower held-out EER than raw embeddings at every checkpoint; ``normalize=False`` gives the
  authors' raw-embedding loss.
* ``floor="softplus"`` replaces the area variant's hard floor ``max(ε, x)`` by ``τ·softplus(x/τ)``
  (``x`` is the signed, ``d*``-relative distance to the threshold): correct pairs within a few
  ``τ`` of ``d*`` keep a gradient, so a batch that is already separated at ``d*`` still trains
  (with the hard floor only the pair that ``d*`` lands on does). The default: it lowered the
  held-out EER in all three paired runs of the study; ``floor="hard"`` is the authors' form.

``evaluate_at="midpoint"`` reproduces a quirk of the authors' code, which evaluates the rates at
the last midpoint of the search instead of at the final ``d*``; the default evaluates at ``d*``.

Persistent threshold (``threshold_momentum=m``, 0 = off, implicit gradient only): at an FMR target
of 0.1 % a batch's ``d*`` is set by its ~30 hardest of ~30 k impostor pairs, so it jumps from
batch to batch, and the loss chases that noise. With ``m > 0`` the loss keeps a running threshold
``d̄ ← m·d̄ + (1−m)·d*`` across training calls (the first call starts it at ``d*``) and is
evaluated at ``d̄`` instead of ``d*``. The gradient stays the implicit one, taken at ``d̄``:
``−(∂F/∂θ)/(∂F/∂d)`` with ``F``'s derivatives at ``d̄``, a weighted mean of the movements of the
pairs near ``d̄`` (so impostors there are still pushed); at ``d̄ = d*`` it is exactly today's
gradient, and it costs no further pass over the pairs. Only calls that train (module in training
mode, autograd on) move ``d̄``; others evaluate at the threshold a training call would use.
``d̄`` is a float64 scalar, identical on every rank of a sharded loss (``d*`` is), and a run's
checkpoint part (``RunningThreshold``), so a resumed run continues it bit for bit.

Several operating points of one kind (``target_rates``, which
:class:`~pipeline.losses.fmr_band.FMRBandLoss` sets to a band of FMRs): the loss is the mean of
the points' losses. They share the pass that finds the pairs, the histogram and the backward
pass's block matmuls; each adds its own threshold search and a pass of elementwise sums.

Pairs in row blocks
-------------------
Every quantity the loss needs is a sum (or a min/max) over pairs: the distance range and the pair
counts, each side's histogram (or exact distances) for the search, the soft rates at ``d*`` and
their slopes in ``d`` (the implicit threshold gradient), the area variant's sums ``Σ floor(u)^β``
and their slopes, the distance sums of the unrolled search. ``_PairSet`` visits the pairs one row
block at a time: a ``B × (B−1+⌊N/2⌋)`` slab of the Gram matrix (never ``N×N×D``, never an ``N×N``
mask) whose owned pairs form a skewed band (row ``i`` owns the ``⌊N/2⌋`` rows after it), ``B``
adapting to ``N`` so that a slab holds at most ``_BLOCK_ELEMENTS`` pairs. A band's few genuine
pairs are located once, from the sorted labels; its impostors are the rest of it, so a sum over
impostors is the sum over the band less that over its genuine pairs, and no pass builds a mask.
Elementwise work runs in chunks of ``_chunk_elements(device)`` pairs: on a CPU few enough that
their temporaries stay in the core's cache, on a GPU a whole band. The bands (every owned
distance) are kept for the later passes when all of them fit in ``_CACHE_BYTES`` (N = 8,192 in
fp32 does), else each pass recomputes them from the Gram blocks, so ``N = 65,536`` runs in
bounded memory. With a cross-batch ``memory`` of ``M`` earlier embeddings (constants), every batch
row also meets every memory row, in ``B × M'`` slabs of the same bound; a rank then scores its own
rows against the whole memory. The loss is a scalar function of the sums;
backward (``_PairSums``) recomputes each pair's coefficient ``∂L/∂distance`` from the sums'
gradients into the band of a coefficient slab and turns it into the embedding gradient with two
block matmuls. Time and peak memory against the bare Gram matmul: ``bench/README.md``.

Host waits
----------
On a GPU the host queues kernels ahead of the device until it needs a value from it (``.item()``,
``float(t)``, ``.tolist()``, a blocking copy, the size of a boolean selection, ``bincount``'s
length); each such read waits for everything queued so far. A default forward and backward pass
wait six times, whatever N and however many blocks and chunks (a memory adds three, sharding two,
an unrolled search two per step): the genuine pairs of all blocks are found at once (the number
of candidates, the blocks' first keys copied to the device, where each block's pairs start), the
search grid's size is read once, and the thresholds once before the pass of sums and once before
backward (the per-pair terms take them as Python numbers, as before: bit-identical values). The
search keeps ``d`` on the device (a fixed number of bisection steps, ``torch.where`` picks the
half), histograms add into a counts vector (``index_add_``), and the pair counts and target rates
reach the device as fills, not copies. ``return_stats`` reads its floats on top (logged steps
only). Counted on the CPU by ``tests/test_eer_host_syncs.py``.

``return_stats``' exact EER is the official EER of the points the search uses: exact distances
where a side has fewer pairs than the search grid has bins, else that side's histogram, i.e. the
distances rounded to ``1/(64k)`` (only pairs within half a bin of the EER threshold can move it).

Sharding the pairs across ranks
-------------------------------
``loss(G, labels, rows=range(start, start + n_local), group=group)``: every rank holds the gathered
global batch ``G`` (``pipeline.distributed.gather_embeddings``: rows in rank order, so ``start`` is
the sum of the lower ranks' local sizes) and scores only the pairs its own rows own (the rule in
``_PairSet``: each unordered pair exactly once over the ranks, ⌊(N−1)/2⌋ or ⌈(N−1)/2⌉ per row, so
a rank's work is proportional to its rows). Every global quantity is all-reduced on ``group`` (min
and max for the range; sums for counts, histograms, rates, slopes, area and distance sums; small
batches all-gather their exact distances), so ``d*``, the loss value and the stats are identical on
every rank. Gradients, precisely:

1. The loss is a function of the global sums ``S = Σ_r S_r``, so ``∂L/∂S`` is the same on every
   rank, and rank r's backward yields ``g_r = ∂L/∂S · ∂S_r/∂G``: its own pairs' share of the
   gradient, w.r.t. every row of ``G`` (``∂L/∂d``, a sum over pairs, is all-reduced inside
   backward, so backward is a collective: every rank runs it).
2. The all-gather's backward (a sum reduce-scatter) gives rank r's local rows ``Σ_r' g_r'``, the
   full ``∂L/∂G`` of those rows, once (a replicated loss gives them ``W`` times that).
3. DDP/DeepSpeed divide the all-reduced parameter gradients by ``W``, so a sharded loss carries a
   gradient scale of ``W = group size`` (``_ScaleGradient``: value unchanged): parameter gradients
   then equal one process holding ``G``.

Every option can be sharded (both variants, every target, ``both_sides``, both distances,
``normalize``, both floors, every ``threshold_grad`` — unrolled costs two collectives per search
step —, ``evaluate_at``, ``threshold_momentum``). Without ``rows`` every rank computes the whole
loss (replicated). In a sum of losses only the EERLoss term takes ``rows``; the other terms stay
replicated (the scale belongs to the sharded term alone).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

Target = Literal["eer"] | Mapping[str, float]

_EPS_SQUARED_DISTANCE = 1e-12  # keeps sqrt differentiable for coincident embeddings
_BINS_PER_UNIT_SHARPNESS = 64  # histogram bins per 1/k of distance in the implicit search
_MAX_BINS = 1 << 22
_BLOCK_ELEMENTS = 1 << 21  # pairs per row block: bounds every per-pair temporary (8–16 MB each)
_CACHE_BYTES = 256 << 20  # a rank's owned distances are kept between passes when they fit
_CPU_CHUNK_ELEMENTS = 1 << 16  # pairs per elementwise chunk on a CPU (see _chunk_elements)
_GPU_CHUNK_ELEMENTS = 1 << 24  # pairs per elementwise chunk on a GPU (see _chunk_elements)
_ROWS_PER_BAND_WIDTH = 1 / 4  # rows of a block per pair a row owns: B − 1 unowned columns cost ≤ 1/4 more


@dataclass(frozen=True)
class EERStats:
    """Diagnostics of one loss call (fractions, not percent), for logging."""

    threshold: float  # where the loss was evaluated, in distance units: d*, or d̄ when persistent
    batch_threshold: float  # the batch's own d* (the midpoint with evaluate_at="midpoint")
    soft_far: float  # FAR_s at the threshold
    soft_frr: float  # FRR_s at the threshold
    exact_eer: float  # EER of the batch's pair distances by the official formula
    genuine_pairs: int
    impostor_pairs: int


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


Memory = tuple[torch.Tensor, torch.Tensor]  # (embeddings [M, D], labels [M]) of earlier batches, constants
Where = tuple[torch.Tensor, torch.Tensor]  # (rows, columns) of some pairs in a block's band


class _RowBlock(NamedTuple):
    """Batch rows ``[a, b)``, each owning the pairs with the ``width`` batch rows after it (mod N).

    Its slab of the Gram matrix holds the columns ``a+1 … b−1+width``; row ``a+i`` owns the slab
    columns ``i … i+width−1``, so the owned pairs form a skewed band: a strided view of the slab.
    """

    a: int
    b: int
    width: int

    @property
    def columns(self) -> int:
        return self.b - self.a - 1 + self.width

    @property
    def skew(self) -> int:
        """How far each row's band starts right of the previous row's."""
        return 1

    @property
    def first_column(self) -> int:
        """Its band's first column among the offsets ``δ − 1`` a row may own: 0, it spans them all."""
        return 0


class _MemoryBlock(NamedTuple):
    """Batch rows ``[a, b)`` against memory rows ``[start, stop)``: a dense slab, all of it the band."""

    a: int
    b: int
    start: int
    stop: int

    @property
    def columns(self) -> int:
        return self.stop - self.start

    @property
    def width(self) -> int:
        return self.stop - self.start

    @property
    def skew(self) -> int:
        """Every row's band starts at the first column."""
        return 0

    @property
    def first_column(self) -> int:
        """Its band's first column among the memory rows."""
        return self.start


_Block = _RowBlock | _MemoryBlock


class _Columns(NamedTuple):
    """A run of a block's slab columns that are consecutive rows of one matrix (no copies)."""

    offset: int  # first slab column
    vectors: torch.Tensor
    norms: torch.Tensor | None  # squared norms, for Euclidean distances
    rows: slice | None  # their rows in the batch; None: memory rows, constants without gradient

    @property
    def span(self) -> slice:
        """Their columns in the slab."""
        return slice(self.offset, self.offset + len(self.vectors))


class _PairSet:
    """The unordered pairs this process scores, one row block at a time.

    Ownership (balanced, so that a rank's work is proportional to its rows): row ``i`` owns the
    pairs ``(i, i+δ mod N)`` for ``δ = 1 … ⌊N/2⌋``, except that for even ``N`` the pair at
    ``δ = N/2`` belongs to the smaller row only (rows from ``N/2`` on own ``δ < N/2``). Every
    unordered pair has exactly one owner and every row owns ``⌊(N−1)/2⌋`` or ``⌈(N−1)/2⌉`` pairs.
    A block of rows owning the same number of pairs (``_RowBlock``) is a dense ``B × (B−1+width)``
    slab of the Gram matrix whose owned pairs form a skewed ``B × width`` band.

    With a cross-batch ``memory`` (embeddings of earlier batches, constants), every row also owns
    its pairs with every memory row: ``_MemoryBlock`` slabs of at most ``_BLOCK_ELEMENTS`` pairs,
    so the rows × memory pairs are partitioned across ranks exactly as the rows are, and only
    the batch side of such a pair receives a gradient.

    The first pass (construction) finds the distance range, the pair counts (all-reduced) and
    where each block's few genuine pairs lie in its band; its impostors are the rest of the band,
    so no pass needs a mask (``totals``, ``gradient``). The bands are kept for the later passes
    when they fit in ``_CACHE_BYTES``, else every pass recomputes them from the Gram block.
    """

    def __init__(
        self, vectors: torch.Tensor, labels: torch.Tensor, rows: range, distance: str, collective: _Collective,
        memory: Memory | None = None,
    ) -> None:
        self.vectors, self.labels, self.distance, self.collective = vectors, labels, distance, collective
        self.memory_vectors, self.memory_labels = memory if memory is not None else (vectors[:0], labels[:0])
        self.norms = vectors.pow(2).sum(1) if distance == "euclidean" else None
        self.memory_norms = self.memory_vectors.pow(2).sum(1) if distance == "euclidean" else None
        self.min_distance = vectors.new_full((), _EPS_SQUARED_DISTANCE).sqrt_()  # where the clamp holds
        self.chunk = _chunk_elements(vectors.device)
        self.blocks: list[_Block] = [*_row_blocks(rows, len(labels)), *_memory_blocks(rows, len(self.memory_labels))]
        owned = sum((block.b - block.a) * block.width for block in self.blocks)
        fits = owned * vectors.element_size() <= _CACHE_BYTES
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if fits else None
        # One buffer for every kept distance: thousands of long-lived pieces between short-lived
        # slabs fragment the heap (measured: 1.06 GB instead of 0.4 GB at N = 16,384).
        self._buffer = vectors.new_empty(owned if fits else 0)
        self._kept = 0
        self._by_label, self._memory_by_label = torch.sort(labels), torch.sort(self.memory_labels)
        self._genuine = self._genuine_pairs(rows)
        self.low, self.high, self.counts = self._first_pass()
        self.sizes = _filled(self.counts, vectors)  # the pair counts as divisors
        if 0 in self.counts:
            raise ValueError(
                f"EERLoss needs at least one genuine and one impostor pair; the batch has "
                f"{self.counts[0]} genuine and {self.counts[1]} impostor pairs (labels: "
                f"{labels.unique().numel()} distinct in {len(labels)} samples)"
            )

    def _first_pass(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """Global (min distance, max distance, (genuine, impostor) counts); fills the cache."""
        low = self.vectors.new_full((), math.inf)
        high = self.vectors.new_full((), -math.inf)
        counts = [0, 0]
        for block, where in zip(self.blocks, self._genuine, strict=True):
            band = self._band_distances(block, keep=self._cache is not None)
            if self._cache is not None:
                self._cache.append((band, band[where]))
            counts[_GENUINE] += len(where[0])
            counts[_IMPOSTOR] += band.numel() - len(where[0])
            smallest, largest = torch.aminmax(band)
            low, high = torch.minimum(low, smallest), torch.maximum(high, largest)
        reduce = self.collective.reduce
        counts = self.collective.total(counts, low.device)
        return reduce(low, dist.ReduceOp.MIN), reduce(high, dist.ReduceOp.MAX), counts

    def _genuine_pairs(self, rows: range) -> list[Where]:
        """Each block's genuine pairs, (rows, columns) in its band in row-major order.

        Found from the sorted labels (a few per row) instead of comparing labels over the bands,
        for all of this process's rows at once and then split by block: how many pairs a block
        holds is data, so a search per block would wait for the device once per block.
        """
        own, n = self.labels[rows.start : rows.stop], len(self.labels)
        row_blocks = [block for block in self.blocks if isinstance(block, _RowBlock)]
        memory_blocks = [block for block in self.blocks if isinstance(block, _MemoryBlock)]
        found: list[Where] = []
        if row_blocks:
            pair_rows, others = _same_label(own, self._by_label)
            columns = (others - rows.start - pair_rows - 1) % n  # δ − 1, from row i to row j
            owned = columns < _pairs_per_row(rows.start + pair_rows, n)
            found += _by_block(row_blocks, pair_rows, columns, n, owned)
        if memory_blocks:
            pair_rows, columns = _same_label(own, self._memory_by_label)
            found += _by_block(memory_blocks, pair_rows, columns, len(self.memory_labels))
        return found

    def _band_distances(self, block: _Block, keep: bool = False) -> torch.Tensor:
        """The block's owned distances, a contiguous ``B × width`` band; ``keep``: in the buffer."""
        band = _band(self._distances(block), block)
        if not keep:
            return band.contiguous()
        kept = self._buffer[self._kept : self._kept + band.numel()].view(band.shape).copy_(band)
        self._kept += band.numel()
        return kept

    def _distances(self, block: _Block) -> torch.Tensor:
        """The block's slab of distances, from its Gram block (never an ``N×N×D`` tensor):
        ``1 − x_i·x_j`` (cosine, unit rows) or ``√(|x_i|² + |x_j|² − 2 x_i·x_j)``."""
        a, b = block[:2]
        rows = self.vectors[a:b]
        slab = rows.new_empty(b - a, block.columns)
        for columns in self._column_pieces(block):
            part = slab[:, columns.span]
            if columns.norms is None:
                part.fill_(1).addmm_(rows, columns.vectors.T, alpha=-1)
            else:
                part.copy_(self.norms[a:b, None]).add_(columns.norms).addmm_(rows, columns.vectors.T, alpha=-2)
        return slab if self.norms is None else slab.clamp_min_(_EPS_SQUARED_DISTANCE).sqrt_()

    def _column_pieces(self, block: _Block) -> list[_Columns]:
        """The block's slab columns in runs of consecutive rows: one run of memory rows, or the
        batch rows split where they wrap past N (the Gram blocks and the column gradients then
        use views of the rows, never copies)."""
        if isinstance(block, _MemoryBlock):
            memory = slice(block.start, block.stop)
            norms = None if self.memory_norms is None else self.memory_norms[memory]
            return [_Columns(0, self.memory_vectors[memory], norms, None)]
        pieces, offset, start, stop, n = [], 0, block.a + 1, block.b + block.width, len(self.labels)
        while start < stop:
            end = min(stop, (start // n + 1) * n)
            rows = slice(start % n, start % n + end - start)
            pieces.append(_Columns(offset, self.vectors[rows], None if self.norms is None else self.norms[rows], rows))
            offset, start = offset + end - start, end
        return pieces

    def bands(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's band of owned distances and its genuine distances: kept ones or recomputed."""
        if self._cache is not None:
            yield from self._cache
            return
        for block, where in zip(self.blocks, self._genuine, strict=True):
            band = self._band_distances(block)
            yield band, band[where]

    def concat(self, side: int) -> torch.Tensor:
        """Every owned distance of one side (0 genuine, 1 impostor), of all ranks."""
        owned = [
            genuine if side == _GENUINE else _without(band, where)
            for (band, genuine), where in zip(self.bands(), self._genuine, strict=True)
        ]  # none on a rank without rows
        return self.collective.concat(torch.cat(owned) if owned else self.vectors.new_zeros(0))

    def totals(
        self, term: Callable[[int, torch.Tensor], torch.Tensor], into: torch.Tensor, chunk: int | None = None
    ) -> torch.Tensor:
        """``into[side] += Σ term(side, distances)`` over this process's pairs of each side, where
        ``term`` gives a vector per call; not all-reduced.

        A block's impostors are its band less its genuine pairs: ``term`` runs over the band in
        chunks of about ``chunk`` pairs (default: the device's, ``_chunk_elements``), and the
        genuine pairs' impostor terms are taken back out.
        """
        for band, genuine in self.bands():
            into[_GENUINE] += term(_GENUINE, genuine)
            chunks = _chunks(band, chunk or self.chunk)
            into[_IMPOSTOR] += sum(term(_IMPOSTOR, x) for _, x in chunks) - term(_IMPOSTOR, genuine)
        return into

    def histograms(self, low: torch.Tensor, width: float, bins: int) -> torch.Tensor:
        """``[2, bins]`` counts of each side's distances rounded to the grid ``low + width·j`` (one pass).

        ``index_add_`` counts, not ``bincount``, which reads its largest index on the host (a wait
        for the device per chunk); the indices are clamped to the grid, which float rounding at its
        ends must not leave.
        """
        one = torch.ones((), dtype=torch.int64, device=low.device)

        def counts(_side: int, x: torch.Tensor) -> torch.Tensor:
            grid = torch.sub(x, low).div_(width).round_().clamp_(0, bins - 1).int()
            return one.new_zeros(bins).index_add_(0, grid, one.expand(len(grid)))

        counted = one.new_zeros(2, bins)
        # Chunks of at least ``bins`` pairs: each chunk's counts cost ``bins`` additions.
        return self.collective.reduce(self.totals(counts, counted, chunk=max(self.chunk, bins)))

    def gradient(
        self, weights: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], thresholds: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``∂/∂vectors`` and ``∂/∂d`` of a sum over owned pairs, given ``weights(side, distances)``:
        per pair ``∂sum/∂distance``, and those pairs' share of ``∂sum/∂d`` for each of the
        ``thresholds`` thresholds.

        Per block, the band of a coefficient slab ``C`` (zero elsewhere) is filled chunk by chunk
        with every pair's weight as an impostor, then the genuine pairs' weights overwrite theirs
        (and their impostor share of ``∂/∂d`` is taken back out); the gradient comes from two
        matmuls, ``C @ columns`` for the rows and ``Cᵀ @ rows`` for the columns. Nothing per pair
        outlives its block.
        """
        grad = torch.zeros_like(self.vectors)
        along_d = self.vectors.new_zeros(thresholds)
        for block, where, (band, genuine) in zip(self.blocks, self._genuine, self.bands(), strict=True):
            slab = _coefficient_slab(block, self.vectors)
            coefficients = _band(slab, block)
            for rows, x in _chunks(band, self.chunk):
                weight, share = weights(_IMPOSTOR, x)
                coefficients[rows] = self._per_gram_term(weight, x).view(-1, band.shape[1])
                along_d += share
            weight, share = weights(_GENUINE, genuine)
            coefficients[where] = self._per_gram_term(weight, genuine)
            along_d += share - weights(_IMPOSTOR, genuine)[1]
            self._accumulate(grad, block, slab)
        return grad, along_d

    def _per_gram_term(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Euclidean ``∂d/∂x_i = (x_i − x_j)/d``: the slab carries ``weight/d``, 0 where the clamp
        holds (there ``d − min`` is 0, elsewhere positive: its sign is a cheaper mask than a comparison)."""
        if self.norms is None:
            return weight
        return weight.div_(x).mul_((x - self.min_distance).sign_())

    def _accumulate(self, grad: torch.Tensor, block: _Block, slab: torch.Tensor) -> None:
        """Add ``Σ_j C_ij ∂d_ij/∂x`` to the rows and the batch columns: ``−C x_j`` (+ ``Σ_j C_ij x_i``
        for Euclidean)."""
        a, b = block[:2]
        rows = self.vectors[a:b]
        euclidean = self.norms is not None
        column_sums = slab.sum(0) if euclidean else None
        for columns in self._column_pieces(block):
            part = slab[:, columns.span]
            grad[a:b].addmm_(part, columns.vectors, alpha=-1)
            if columns.rows is None:
                continue
            grad[columns.rows].addmm_(part.T, rows, alpha=-1)
            if euclidean:
                grad[columns.rows].addcmul_(column_sums[columns.span, None], columns.vectors)
        if euclidean:
            grad[a:b].addcmul_(slab.sum(1, keepdim=True), rows)


def _band(slab: torch.Tensor, block: _Block) -> torch.Tensor:
    """The block's owned pairs in its slab: a ``B × width`` view (row ``i`` from column ``i·skew``)."""
    return slab.as_strided((block.b - block.a, block.width), (block.columns + block.skew, 1), slab.storage_offset())


def _coefficient_slab(block: _Block, like: torch.Tensor) -> torch.Tensor:
    """A slab for the block's coefficients, zero outside its band, uninitialised inside.

    Outside a row block's band, row ``i``'s columns after its band and row ``i+1``'s before it
    are ``B`` consecutive elements: a strided view too, zeroed without touching the band.
    """
    slab = like.new_empty(block.b - block.a, block.columns)
    if block.skew:
        height = block.b - block.a
        slab.as_strided((height - 1, height), (block.columns + 1, 1), block.width).zero_()
    return slab


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
    blocks: list[_Block], rows: torch.Tensor, columns: torch.Tensor, stride: int, owned: torch.Tensor | None = None
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


def _pairs_per_row(rows: torch.Tensor, n: int) -> torch.Tensor:
    """How many pairs each batch row owns (``_PairSet``): ``⌊N/2⌋``, one fewer from row N/2 on for even N."""
    reach = n // 2
    return torch.where(rows < reach, reach, reach - 1 + n % 2)


def _without(band: torch.Tensor, where: Where) -> torch.Tensor:
    """The band's distances except those at ``where``, in row-major order.

    By index, not by a boolean mask, whose selection would read its size on the host: with ``p_j``
    the removed positions in order, the ``k``-th kept distance is at ``k + #{j : p_j − j ≤ k}``.
    """
    removed = where[0] * band.shape[1] + where[1]
    kept = torch.arange(band.numel() - len(removed), device=band.device)
    before = torch.searchsorted(removed - torch.arange(len(removed), device=band.device), kept, right=True)
    return band.reshape(-1)[kept + before]


def _chunk_elements(device: torch.device) -> int:
    """Pairs per elementwise chunk on ``device``.

    A CPU core runs a chunk's ~35 torch calls fastest when their temporaries (256 KiB each in
    fp32) stay in its cache. A GPU pays a few µs to launch each kernel, however small, and 64 K
    pairs are less work than that: there a chunk is as large as a bounded memory allows, 16 M
    pairs, 64 MiB per fp32 temporary with a handful alive at once. As a band holds at most
    ``_BLOCK_ELEMENTS`` pairs, a GPU takes each band in one chunk.
    """
    return _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _GPU_CHUNK_ELEMENTS


def _filled(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a vector of ``like``'s dtype and device, filled on the device: copying a host
    list there is a blocking copy, which waits for the device."""
    return torch.stack([like.new_full((), value) for value in values])


def _chunks(band: torch.Tensor, elements: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Slices of a contiguous band's rows holding about ``elements`` pairs (at least a row), flattened."""
    height, width = band.shape
    step = max(1, elements // max(1, width))
    for start in range(0, height, step):
        rows = slice(start, start + step)
        yield rows, band[rows].view(-1)


def _row_blocks(rows: range, n: int) -> list[_RowBlock]:
    """Row blocks whose slabs, ``B × (B−1+width)``, hold at most ``_BLOCK_ELEMENTS`` pairs, with at
    most ``width/4`` rows (at N = 2,048 the bound alone gives B ≈ width: slabs of twice the owned
    pairs); for even ``N`` the rows from ``N/2`` on own one pair fewer, so no block spans ``N/2``."""
    reach = n // 2
    size = int((-(reach - 1) + math.sqrt((reach - 1) ** 2 + 4 * _BLOCK_ELEMENTS)) / 2)
    size = max(1, min(len(rows), size, int(reach * _ROWS_PER_BAND_WIDTH)))
    if n % 2:
        segments = [(rows.start, rows.stop, reach)]
    else:
        segments = [(rows.start, min(rows.stop, reach), reach), (max(rows.start, reach), rows.stop, reach - 1)]
    return [
        _RowBlock(a, min(a + size, stop), width)
        for start, stop, width in segments
        if width > 0
        for a in range(start, stop, size)
    ]


def _memory_blocks(rows: range, memory_rows: int) -> list[_MemoryBlock]:
    """Slabs of ``rows`` × memory rows holding at most ``_BLOCK_ELEMENTS`` pairs each."""
    if memory_rows == 0 or len(rows) == 0:
        return []
    width = min(memory_rows, _BLOCK_ELEMENTS)
    height = max(1, _BLOCK_ELEMENTS // width)
    return [
        _MemoryBlock(a, min(a + height, rows.stop), start, min(start + width, memory_rows))
        for a in range(rows.start, rows.stop, height)
        for start in range(0, memory_rows, width)
    ]


_GENUINE, _IMPOSTOR = 0, 1
_SIGNS = (1.0, -1.0)  # a genuine pair errs above d, an impostor pair below
_RATE, _AREA, _DISTANCE = 0, 1, 2  # columns of the sums
_SLOPE = 3  # the sums' slopes in d follow: _SLOPE + _RATE, _SLOPE + _AREA


@dataclass(frozen=True)
class _Terms:
    """What one pass over the pairs sums, per side: soft steps, area terms (on the sides the loss
    keeps: an FMR target's loss has no impostor term, and most pairs are impostors), their
    slopes, distances."""

    rates: bool = True
    area: tuple[bool, bool] = (False, False)  # genuine, impostor
    slopes: bool = False
    distances: bool = False


class _PairSums(torch.autograd.Function):
    """Global sums over pairs at the thresholds ``d`` (``[P]``, one per operating point):
    ``sums[side, point, (rate, area, distance)]`` and ``slopes``.

    ``slopes[side, point, (rate, area)]`` are the sums' derivatives in that point's ``d`` (no
    gradient: the implicit threshold gradient needs their values only). Backward makes one more
    pass over the blocks: each pair's coefficient ``Σ_point Σ_s ∂L/∂sum_s · ∂term_s/∂distance``
    (recomputed, never stored) goes into that block's coefficient slab, so several points cost
    one pass of elementwise terms each but one pair of block matmuls in all; ``∂L/∂d`` is a sum
    over pairs, all-reduced so that every rank continues with the global value.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, vectors: torch.Tensor, d: torch.Tensor, pairs: _PairSet, loss: EERLoss, terms: _Terms
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ats = d.tolist()

        def point_sums(side: int, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([_side_sums(loss, terms, side, x, at) for at in ats])

        totals = pairs.collective.reduce(pairs.totals(point_sums, vectors.new_zeros(2, len(ats), 5)))
        ctx.save_for_backward(d)
        ctx.pairs, ctx.loss, ctx.terms = pairs, loss, terms
        sums, slopes = totals[..., :_SLOPE].clone(), totals[..., _SLOPE:].clone()
        ctx.mark_non_differentiable(slopes)
        return sums, slopes

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_sums: torch.Tensor, _grad_slopes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, None, None, None]:
        (d,) = ctx.saved_tensors
        ats, need_d = d.tolist(), ctx.needs_input_grad[1]

        def weights(side: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            each = [
                _side_weights(ctx.loss, ctx.terms, side, x, at, grad_sums[side, point], need_d)
                for point, at in enumerate(ats)
            ]
            return functools.reduce(torch.Tensor.add_, [w for w, _ in each]), torch.stack([s for _, s in each])

        grad_vectors, grad_d = ctx.pairs.gradient(weights, len(ats))
        if not need_d:
            return grad_vectors, None, None, None, None
        return grad_vectors, ctx.pairs.collective.reduce(grad_d), None, None, None


def _side_sums(loss: EERLoss, terms: _Terms, side: int, x: torch.Tensor, d: float) -> torch.Tensor:
    """One side's sums over the distances ``x``: ``[rate, area, distance, ∂rate/∂d, ∂area/∂d]``,
    zero where ``terms`` leaves them out."""
    sums = [x.new_zeros(())] * 5
    if terms.rates:
        step, along_x = loss._soft_step(x, d, side, derivative=terms.slopes)
        sums[_RATE] = step.sum()
        if terms.slopes:
            sums[_SLOPE + _RATE] = -along_x.sum()  # ∂/∂d = −∂/∂x
    if terms.area[side]:
        term, along_x = loss._area_term(x, d, side, derivative=terms.slopes)
        sums[_AREA] = term.sum()
        if terms.slopes:
            sums[_SLOPE + _AREA] = torch.dot(x, along_x) / -d  # ∂/∂d = −(x/d)·∂/∂x
    if terms.distances:
        sums[_DISTANCE] = x.sum()
    return torch.stack(sums)


def _side_weights(
    loss: EERLoss, terms: _Terms, side: int, x: torch.Tensor, d: float, grad: torch.Tensor, need_d: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ``∂L/∂distance`` of one side's distances ``x``, and (if ``need_d``) their share of ``∂L/∂d``."""
    parts, along_d = [], x.new_zeros(())
    if terms.rates:
        _, along_x = loss._soft_step(x, d, side, derivative=True)
        parts.append(along_x.mul_(grad[_RATE]))
        if need_d:
            along_d -= along_x.sum()  # ∂/∂d = −∂/∂x
    if terms.area[side]:
        _, along_x = loss._area_term(x, d, side, derivative=True)
        parts.append(along_x.mul_(grad[_AREA]))
        if need_d:
            along_d -= torch.dot(x, along_x) / d  # ∂/∂d = −(x/d)·∂/∂x
    weight = functools.reduce(torch.Tensor.add_, parts) if parts else torch.zeros_like(x)
    return weight.add_(grad[_DISTANCE]) if terms.distances else weight, along_d


class _ScaleGradient(torch.autograd.Function):
    """Identity in value; multiplies the gradient by ``scale`` (see "Sharding" in the module doc)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def _distance_vectors(embeddings: torch.Tensor, labels: torch.Tensor, distance: str) -> torch.Tensor:
    """The rows whose Gram matrix gives the distances (unit rows for cosine), shapes checked."""
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"expected embeddings [N, D] and labels [N], got {tuple(embeddings.shape)} "
            f"and {tuple(labels.shape)}"
        )
    return F.normalize(embeddings, dim=1) if distance == "cosine" else embeddings


def pair_distances(
    embeddings: torch.Tensor, labels: torch.Tensor, distance: str = "euclidean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Genuine and impostor distances of every unordered pair (no gradient: for tests, diagnostics)."""
    if distance not in ("euclidean", "cosine"):
        raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
    vectors = _distance_vectors(embeddings.detach(), labels, distance)
    pairs = _PairSet(vectors, labels, range(len(labels)), distance, _Collective())
    return pairs.concat(_GENUINE), pairs.concat(_IMPOSTOR)


class RunningThreshold:
    """A persistent threshold ``d̄ ← m·d̄ + (1−m)·d*`` (see the module doc): a float64 scalar, NaN
    until the first training call sets it to that batch's ``d*``; a run's checkpoint part.

    Not a buffer of the loss module: DeepSpeed would cast it to bf16 with the module, where the
    update of a 0.99 average stalls (its steps fall below bf16's resolution of the threshold).
    """

    def __init__(self, momentum: float) -> None:
        self.momentum = float(momentum)
        self.value = torch.full((), math.nan, dtype=torch.float64)

    def blend(self, batch_threshold: torch.Tensor, keep: bool) -> torch.Tensor:
        """``m·d̄ + (1−m)·d*`` (``d*`` alone the first time), as a constant in ``d*``'s dtype;
        ``keep``: it becomes the new ``d̄``."""
        batch = batch_threshold.detach().double()
        previous = self.value.to(batch.device)
        value = torch.where(previous.isnan(), batch, torch.lerp(batch, previous, self.momentum))
        if keep:
            self.value = value
        return value.to(batch_threshold.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


class EERLoss(torch.nn.Module):
    """Smooth EER (or any DET operating point) of a batch, ``loss(embeddings, labels)``.

    Args:
        variant: ``"area"`` (authors' recommended form) or ``"direct"`` (the soft error rate).
        distance: ``"euclidean"`` or ``"cosine"`` (``1 − cos``).
        k: sharpness of the soft step, in 1/distance units.
        search_steps: steps of the threshold search.
        target: ``"eer"``, ``{"fmr": t}`` or ``{"fnmr": t}`` (rates as fractions).
        alpha, beta, eps: margin, power and floor of the area variant.
        threshold_grad: ``"implicit"``, ``"unrolled"`` or ``"detached"`` (see the module doc).
        evaluate_at: ``"threshold"`` (at d*) or ``"midpoint"`` (authors' last midpoint).
        normalize: L2-normalise the embeddings first (the default: it won in the issue-8 study).
        floor, tau: the area variant's floor, ``"hard"`` ``max(ε, x)`` or ``"softplus"`` ``τ·softplus(x/τ)``.
        both_sides: with an FMR or FNMR target, keep both area terms instead of only the one the
            target does not fix (the authors' form; docs/results.md §5 measures both).
        threshold_momentum: ``m`` of a persistent threshold ``d̄ ← m·d̄ + (1−m)·d*`` across
            training calls (see the module doc); 0, the default, searches every batch afresh.
    """

    def __init__(
        self,
        variant: Literal["area", "direct"] = "area",
        distance: Literal["euclidean", "cosine"] = "euclidean",
        k: float = 100.0,
        search_steps: int = 16,
        target: Target = "eer",
        alpha: float = 0.0,
        beta: float = 0.85,
        eps: float = 1e-7,
        threshold_grad: Literal["implicit", "unrolled", "detached"] = "implicit",
        evaluate_at: Literal["threshold", "midpoint"] = "threshold",
        normalize: bool = True,
        floor: Literal["hard", "softplus"] = "softplus",
        tau: float = 0.05,
        both_sides: bool = False,
        threshold_momentum: float = 0.0,
    ) -> None:
        super().__init__()
        if variant not in ("area", "direct"):
            raise ValueError(f"variant must be 'area' or 'direct', got {variant!r}")
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
        if threshold_grad not in ("implicit", "unrolled", "detached"):
            raise ValueError(f"threshold_grad must be implicit, unrolled or detached, got {threshold_grad!r}")
        if evaluate_at not in ("threshold", "midpoint"):
            raise ValueError(f"evaluate_at must be 'threshold' or 'midpoint', got {evaluate_at!r}")
        if floor not in ("hard", "softplus"):
            raise ValueError(f"floor must be 'hard' or 'softplus', got {floor!r}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0 < beta < 2:
            raise ValueError(f"beta must lie in (0, 2), got {beta}")
        if not 0 <= threshold_momentum < 1:
            raise ValueError(f"threshold_momentum must lie in [0, 1), got {threshold_momentum}")
        if threshold_momentum and threshold_grad != "implicit":
            raise ValueError(
                f"threshold_momentum={threshold_momentum} needs threshold_grad='implicit' (the persistent "
                f"threshold carries the implicit gradient of the root), got {threshold_grad!r}"
            )
        if k <= 0 or search_steps < 1:
            raise ValueError(f"k must be > 0 and search_steps >= 1, got k={k}, search_steps={search_steps}")
        self.variant, self.distance = variant, distance
        self.k, self.search_steps = float(k), int(search_steps)
        self.target_kind, self.target_rate = _parse_target(target)
        self.target_rates: tuple[float, ...] = (self.target_rate,)  # a band of points: FMRBandLoss
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)
        self.threshold_grad, self.evaluate_at = threshold_grad, evaluate_at
        self.normalize, self.floor, self.tau = bool(normalize), floor, float(tau)
        self.both_sides = bool(both_sides)
        self.running_threshold = RunningThreshold(threshold_momentum) if threshold_momentum else None

    def extra_repr(self) -> str:
        rates = "/".join(f"{rate:g}" for rate in self.target_rates)
        target = "eer" if self.target_kind == "eer" else f"{self.target_kind}={rates}"
        return (
            f"variant={self.variant}, distance={self.distance}, k={self.k:g}, "
            f"search_steps={self.search_steps}, target={target}, threshold_grad={self.threshold_grad}, "
            f"alpha={self.alpha:g}, beta={self.beta:g}, normalize={self.normalize}, floor={self.floor}, "
            f"both_sides={self.both_sides}"
            + (f", threshold_momentum={self.running_threshold.momentum:g}" if self.running_threshold else "")
        )

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        return_stats: bool = False,
        *,
        rows: range | slice | None = None,
        group: dist.ProcessGroup | None = None,
        memory: Memory | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, EERStats]:
        """The loss of the batch; with ``rows``, this rank's share of it (see "Sharding" above).

        Args:
            embeddings, labels: the batch ``[N, D]``, ``[N]`` (with ``rows``: the gathered
                global batch, identical on every rank of ``group``).
            return_stats: also return the batch's ``EERStats`` (global ones when sharded).
            rows: this rank's own rows of the batch (``range(start, start + n_local)``); it
                then scores only the pairs those rows own, and ``group`` sums the shares.
            group: the process group of the ranks sharing the batch (default: the world).
            memory: ``(embeddings [M, D], labels [M])`` of earlier batches (a cross-batch memory,
                identical on every rank): every pair (batch row, memory row) is scored too, as a
                constant on the memory side (``pipeline/training/memory.py``).
        """
        if rows is not None and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("rows= shards the pairs across a process group, but none is initialised")
        collective = _Collective(group, sharded=rows is not None)
        own = range(len(labels)) if rows is None else _row_range(rows, len(labels))
        return self._loss(embeddings, labels, return_stats, own, collective, memory)

    def _loss(
        self, embeddings: torch.Tensor, labels: torch.Tensor, return_stats: bool, rows: range, collective: _Collective,
        memory: Memory | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, EERStats]:
        vectors = self._vectors(embeddings, labels)
        if memory is not None:
            memory = self._vectors(memory[0].detach().to(vectors.dtype), memory[1]), memory[1]
        pairs = _PairSet(vectors.detach(), labels, rows, self.distance, collective, memory)
        points = None
        if self.threshold_grad == "unrolled":
            searches = [self._unrolled_search(vectors, pairs, rate) for rate in self.target_rates]
        else:
            points = self._points(pairs)
            with torch.no_grad():
                searches = [self._bisection_search(points, pairs, rate) for rate in self.target_rates]
        threshold, midpoint = (torch.stack(found) for found in zip(*searches))
        batch_at = midpoint if self.evaluate_at == "midpoint" else threshold
        at = batch_at
        if self.running_threshold is not None:  # one point (FMRBandLoss refuses it)
            at = self.running_threshold.blend(batch_at[0], self._trains()).reshape(1)
        loss, at, frr, far = self._at_threshold(vectors, pairs, at)
        if collective.world > 1:
            loss = _ScaleGradient.apply(loss, float(collective.world))
        if not return_stats:
            return loss
        return loss, self._stats(points or self._points(pairs), pairs, at[0], batch_at[0], frr[0], far[0])

    def _trains(self) -> bool:
        """Whether this call trains (and so moves a persistent threshold): evaluation does not."""
        return self.training and torch.is_grad_enabled()

    def _at_threshold(
        self, vectors: torch.Tensor, pairs: _PairSet, at: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, d*, FRR_s, FAR_s) at the thresholds ``at`` (one per point of ``target_rates``),
        from one pass of sums over the pairs; the loss is the mean over the points."""
        area = self._area_sides() if self.variant == "area" else (False, False)
        terms = _Terms(area=area, slopes=self.threshold_grad == "implicit")
        sums, slopes = _PairSums.apply(vectors, at, pairs, self, terms)
        sizes = pairs.sizes[:, None, None]
        means, mean_slopes = sums / sizes, slopes / sizes
        if self.threshold_grad == "implicit":
            # d* = d + (0 in value) carrying −(∂F/∂θ)/(∂F/∂d); the means follow to first order.
            rates, rate_slopes = means[..., _RATE], mean_slopes[..., _RATE]
            targets = _filled(self.target_rates, rates)
            shift = _implicit_shift(self._equation(*rates, targets), self._equation(*rate_slopes, 0.0))
            at = at + shift
            means = means[..., : _AREA + 1] + mean_slopes * shift[:, None]
        frr, far = means[_GENUINE, :, _RATE], means[_IMPOSTOR, :, _RATE]
        loss = self._direct(frr, far) if self.variant == "direct" else self._area(means[..., _AREA])
        return loss.mean(), at, frr, far

    def _vectors(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The rows whose Gram matrix gives the pair distances, as the options ask."""
        if embeddings.dtype not in (torch.float32, torch.float64):
            embeddings = embeddings.float()  # bf16/fp16 embeddings: the search needs fp32 resolution
        if self.normalize:
            embeddings = F.normalize(embeddings, dim=1)
        return _distance_vectors(embeddings, labels, self.distance)

    # -- the threshold search -------------------------------------------------------------------
    def _equation(self, frr: torch.Tensor, far: torch.Tensor, target: float | torch.Tensor) -> torch.Tensor:
        """``F = a − b``: positive while the threshold is too low, decreasing in ``d``.

        ``target`` is the point's rate; 0 drops it: applied to the rates' slopes that gives ``∂F/∂d``.
        """
        if self.target_kind == "fmr":
            return target - far
        if self.target_kind == "fnmr":
            return frr - target
        return frr - far

    def _points(self, pairs: _PairSet) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each side's distances as (points, counts) for the search and the stats.

        When there are more pairs than a grid of ``_BINS_PER_UNIT_SHARPNESS`` bins per ``1/k``
        needs, the pairs are binned (one pass; each pair moves by at most half a bin,
        ``1/(2·64·k)``, far below the soft step), so each search step costs the grid, not the
        pairs; otherwise the points are the exact distances, gathered from every rank. The grid's
        size is a shape, so the host reads the distance range once here.
        """
        span = float(pairs.high - pairs.low)
        bins = math.ceil(span * self.k * _BINS_PER_UNIT_SHARPNESS) + 1
        exact = [bins >= count or bins > _MAX_BINS for count in pairs.counts]
        if not all(exact):
            width = span / (bins - 1)
            histograms = pairs.histograms(pairs.low, width, bins).to(pairs.low.dtype)
            centers = pairs.low + width * torch.arange(bins, dtype=histograms.dtype, device=histograms.device)
        points = []
        for side, exact_side in enumerate(exact):
            distances = pairs.concat(side) if exact_side else centers
            points.append((distances, torch.ones_like(distances) if exact_side else histograms[side]))
        return points

    def _bisection_search(
        self, points: list[tuple[torch.Tensor, torch.Tensor]], pairs: _PairSet, target: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard bisection on the soft rates of the (binned) points for the ``target`` rate, without
        autograd; ``d`` and the bounds stay on the device (``torch.where`` picks the half), so the
        host never waits for a step."""
        weights = [counts / size for (_, counts), size in zip(points, pairs.sizes, strict=True)]

        def rate(side: int, d: torch.Tensor) -> torch.Tensor:
            return (weights[side] * self._soft_step(points[side][0], d, side)[0]).sum()

        left, right = pairs.low.clone(), pairs.high.clone()
        midpoint = (left + right) / 2
        for _ in range(self.search_steps):
            midpoint = (left + right) / 2
            too_low = self._equation(rate(_GENUINE, midpoint), rate(_IMPOSTOR, midpoint), target) > 0
            left = torch.where(too_low, midpoint, left)
            right = torch.where(too_low, right, midpoint)
        return (left + right) / 2, midpoint

    def _unrolled_search(
        self, vectors: torch.Tensor, pairs: _PairSet, target: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The authors' smooth binary search for the ``target`` rate, differentiable through every
        step (one pass each)."""
        sums, _ = _PairSums.apply(vectors, vectors.new_zeros(1), pairs, self, _Terms(rates=False, distances=True))
        means = sums[:, 0, _DISTANCE] / pairs.sizes
        left, right = 0.5 * means[_GENUINE], 1.5 * means[_IMPOSTOR]
        midpoint = (left + right) / 2
        for _ in range(self.search_steps):
            midpoint = (left + right) / 2
            sums, _ = _PairSums.apply(vectors, midpoint.reshape(1), pairs, self, _Terms())
            rates = sums[:, 0, _RATE] / pairs.sizes
            push_right, push_left = self._search_pressures(100 * rates[_GENUINE], 100 * rates[_IMPOSTOR], target)
            top = torch.maximum(push_right, push_left)
            move_left = torch.exp(self.k * (push_right - top))
            move_right = torch.exp(self.k * (push_left - top))
            left = left * (1 - move_left) + midpoint * move_left
            right = right * (1 - move_right) + midpoint * move_right
        return (left + right) / 2, midpoint

    def _search_pressures(
        self, frr_pct: torch.Tensor, far_pct: torch.Tensor, target: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) in percent: the search raises ``d`` while ``a > b``."""
        target_pct = frr_pct.new_full((), 100 * target)
        if self.target_kind == "fmr":
            return target_pct, far_pct
        if self.target_kind == "fnmr":
            return frr_pct, target_pct
        return frr_pct, far_pct

    # -- the per-pair terms (one implementation, used by the search, forward and backward) -------
    def _soft_step(
        self, x: torch.Tensor, d: float | torch.Tensor, side: int, derivative: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``tanh(k · max(0, s·(x − d)))`` per pair (``s`` = +1 genuine, −1 impostor), and its
        derivative in ``x`` (the one in ``d`` is its negative)."""
        scale = _SIGNS[side] * self.k
        z = (x - d).mul_(scale).clamp_min_(0)
        step = torch.tanh(z)
        if not derivative:
            return step, None
        return step, torch.ops.aten.tanh_backward(z.sign_().mul_(scale), step)  # [z > 0]·(1 − t²)·s·k

    def _area_term(
        self, x: torch.Tensor, d: float, side: int, derivative: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``floor(u)^β`` per pair with ``u = (ℓ − (1−α)d)/d`` (genuine) or ``((1+α)d − i)/d``
        (impostor), and its derivative in ``x`` (the one in ``d`` is ``−(x/d)`` times it).

        The power is taken as ``exp(β·log)``: three times faster than ``pow`` on CPU.
        """
        along_u = _SIGNS[side] / d  # ∂u/∂x
        offset = -(1 - self.alpha) if side == _GENUINE else 1 + self.alpha
        if self.floor == "softplus":
            v = x.mul(along_u / self.tau).add_(offset / self.tau)  # u/τ
            floored = _softplus(v).mul_(self.tau)  # τ·softplus(u/τ)
        else:
            floored = x.mul(along_u).add_(offset)
        clamped = floored.clamp_min(self.eps)
        term = clamped.log().mul_(self.beta).exp_()
        if not derivative:
            return term, None
        along_x = torch.div(term, clamped, out=clamped).mul_(floored.ge_(self.eps)).mul_(self.beta * along_u)
        return term, along_x.mul_(v.sigmoid_()) if self.floor == "softplus" else along_x

    # -- the loss at the threshold --------------------------------------------------------------
    def _direct(self, frr: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
        if self.target_kind == "fmr":
            return 100 * frr
        if self.target_kind == "fnmr":
            return 100 * far
        return 100 * (frr + far) / 2

    def _area_sides(self) -> tuple[bool, bool]:
        """Whether the area variant keeps the (genuine, impostor) term: both for the EER, else the
        side the target does not fix (or both with ``both_sides``)."""
        return self.target_kind != "fnmr" or self.both_sides, self.target_kind != "fmr" or self.both_sides

    def _area(self, means: torch.Tensor) -> torch.Tensor:
        """100 · the power means ``(mean floor(u)^β)^(1/β)`` of the sides the target keeps."""
        kept = [means[side].pow(1 / self.beta) for side, keep in enumerate(self._area_sides()) if keep]
        return 100 * sum(kept)

    def _stats(
        self,
        points: list[tuple[torch.Tensor, torch.Tensor]],
        pairs: _PairSet,
        d: torch.Tensor,
        batch_d: torch.Tensor,
        frr: torch.Tensor,
        far: torch.Tensor,
    ) -> EERStats:
        return EERStats(
            threshold=float(d.detach()),
            batch_threshold=float(batch_d.detach()),
            soft_far=float(far.detach()),
            soft_frr=float(frr.detach()),
            exact_eer=_points_eer(points),
            genuine_pairs=pairs.counts[_GENUINE],
            impostor_pairs=pairs.counts[_IMPOSTOR],
        )


def _softplus(v: torch.Tensor) -> torch.Tensor:
    """``F.softplus(v)`` (``log1p(exp(v))``, ``v`` itself above 20) from ``exp`` and ``log1p``: faster on CPU."""
    exp = v.clamp_max(20).exp_()
    return torch.maximum(exp.log1p_(), v, out=exp)


def _parse_target(target: Target) -> tuple[str, float]:
    if target == "eer":
        return "eer", 0.0
    if isinstance(target, Mapping) and len(target) == 1:
        ((kind, rate),) = target.items()
        if kind in ("fmr", "fnmr") and 0 < float(rate) < 1:
            return kind, float(rate)
    raise ValueError(f"target must be 'eer', {{'fmr': t}} or {{'fnmr': t}} with 0 < t < 1, got {target!r}")


def _row_range(rows: range | slice, n: int) -> range:
    """``rows`` as a contiguous ``range`` inside ``[0, n)``."""
    own = range(n)[rows] if isinstance(rows, slice) else rows
    if not isinstance(own, range) or own.step != 1 or (len(own) and (own.start < 0 or own.stop > n)):
        raise ValueError(f"rows must be a contiguous range of rows in [0, {n}), got {rows!r}")
    return own


def _points_eer(points: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The official EER of the points weighted by their counts (exact when the points are)."""
    from sklearn.metrics import roc_curve

    from pipeline.metrics.verification import Roc

    scores = -torch.cat([p for p, _ in points]).detach().double().cpu().numpy()
    counts = torch.cat([c for _, c in points]).double().cpu().numpy()
    truth = np.r_[np.ones(points[_GENUINE][0].numel()), np.zeros(points[_IMPOSTOR][0].numel())]
    kept = counts > 0
    return Roc(*roc_curve(truth[kept], scores[kept], sample_weight=counts[kept])).eer()[0]


def _implicit_shift(equation: torch.Tensor, equation_slope: torch.Tensor) -> torch.Tensor:
    """Zero in value; gradient ``−(∂F/∂θ)/(∂F/∂d)``, the derivative of the root of ``F = 0`` (per point).

    Where no pair is near a threshold the slope vanishes, and so does ``∂F/∂θ``: that point's
    shift is then dropped instead of dividing by zero.
    """
    slope = equation_slope.detach()
    flat = slope.abs() < 1e-12
    shift = -(equation - equation.detach()) / torch.where(flat, torch.ones_like(slope), slope)
    return torch.where(flat, torch.zeros_like(shift), shift)
