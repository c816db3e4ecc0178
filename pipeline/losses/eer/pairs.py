"""Which pairs this process scores, and the passes over them, one row block at a time.

Why: every quantity EERLoss needs is a sum (or a min, a max) over pairs — the distance range and
the pair counts, each side's histogram or exact distances for the search, the soft rates and
the area terms at the threshold and their slopes, the distance sums of the unrolled search — so
the pairs are enumerated once here and every pass is a sum over them, in bounded memory.

- **Row blocks**: a ``B × (B−1+⌊N/2⌋)`` slab of the Gram matrix (``slabs``) whose owned pairs
  form a skewed band (row ``i`` owns the ``⌊N/2⌋`` rows after it); ``B`` adapts to ``N`` so that
  a slab holds at most ``_BLOCK_ELEMENTS`` pairs.
- **Genuine and impostor pairs**: a band's few genuine pairs are located once (``genuine_pairs``);
  its impostors are the rest of it, so a sum over impostors is the sum over the band less that
  over its genuine pairs, and no pass builds a mask.
- **Chunks**: elementwise work runs in chunks of ``_chunk_elements(device)`` pairs: on a CPU few
  enough that their temporaries stay in the core's cache, on a GPU a whole band.
- **Kept distances**: the bands are kept for the later passes when all of them fit in
  ``_CACHE_BYTES`` (N = 8,192 in fp32 does), else each pass recomputes them from the Gram
  blocks, so ``N = 65,536`` runs in bounded memory.
- **Memory slabs**: with a cross-batch ``memory`` of ``M`` earlier embeddings (constants), every
  batch row also meets every memory row, in ``B × M'`` slabs of the same bound.
- **Sharding**: with ``rows``, a rank scores only the pairs its own rows own (of the batch and
  against the whole memory); the ownership rule gives every unordered pair exactly one owner and
  every rank work in proportion to its rows, and ``collective`` sums the shares.

Time and peak memory against the bare Gram matmul: ``bench/README.md``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.losses.eer.collective import _Collective
from pipeline.losses.eer.genuine_pairs import Where, _by_block, _same_label, _without
from pipeline.losses.eer.slabs import _band, _Block, _coefficient_slab, _GramSlabs, _MemoryBlock, _RowBlock

_BLOCK_ELEMENTS = 1 << 21  # pairs per row block: bounds every per-pair temporary (8–16 MB each)
_CACHE_BYTES = 256 << 20  # a rank's owned distances are kept between passes when they fit
_CPU_CHUNK_ELEMENTS = 1 << 16  # pairs per elementwise chunk on a CPU (see _chunk_elements)
_GPU_CHUNK_ELEMENTS = 1 << 24  # pairs per elementwise chunk on a GPU (see _chunk_elements)
_ROWS_PER_BAND_WIDTH = 1 / 4  # rows of a block per pair a row owns: B − 1 unowned columns cost ≤ 1/4 more

_GENUINE, _IMPOSTOR = 0, 1  # the sides of a pair, and the first index of every per-side sum

Memory = tuple[torch.Tensor, torch.Tensor]  # (embeddings [M, D], labels [M]) of earlier batches, constants


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
        self.vectors, self.labels, self.collective = vectors, labels, collective
        memory_vectors, self.memory_labels = memory if memory is not None else (vectors[:0], labels[:0])
        self.gram = _GramSlabs(vectors, distance, memory_vectors)
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
        totals = self.collective.total(counts, low.device)
        return reduce(low, dist.ReduceOp.MIN), reduce(high, dist.ReduceOp.MAX), totals

    def _genuine_pairs(self, rows: range) -> list[Where]:
        """Each block's genuine pairs, (rows, columns) in its band in row-major order."""
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
        band = _band(self.gram.distances(block), block)
        if not keep:
            return band.contiguous()
        kept = self._buffer[self._kept : self._kept + band.numel()].view(band.shape).copy_(band)
        self._kept += band.numel()
        return kept

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
        matmuls (``_GramSlabs.accumulate``). Nothing per pair outlives its block.
        """
        grad = torch.zeros_like(self.vectors)
        along_d = self.vectors.new_zeros(thresholds)
        for block, where, (band, genuine) in zip(self.blocks, self._genuine, self.bands(), strict=True):
            slab = _coefficient_slab(block, self.vectors)
            coefficients = _band(slab, block)
            for rows, x in _chunks(band, self.chunk):
                weight, share = weights(_IMPOSTOR, x)
                coefficients[rows] = self.gram.per_gram_term(weight, x).view(-1, band.shape[1])
                along_d += share
            weight, share = weights(_GENUINE, genuine)
            coefficients[where] = self.gram.per_gram_term(weight, genuine)
            along_d += share - weights(_IMPOSTOR, genuine)[1]
            self.gram.accumulate(grad, block, slab)
        return grad, along_d


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


def _pairs_per_row(rows: torch.Tensor, n: int) -> torch.Tensor:
    """How many pairs each batch row owns (``_PairSet``): ``⌊N/2⌋``, one fewer from row N/2 on for even N."""
    reach = n // 2
    return torch.where(rows < reach, reach, reach - 1 + n % 2)


def _chunk_elements(device: torch.device) -> int:
    """Pairs per elementwise chunk on ``device``.

    A CPU core runs a chunk's ~35 torch calls fastest when their temporaries (256 KiB each in
    fp32) stay in its cache. A GPU pays a few µs to launch each kernel, however small, and 64 K
    pairs are less work than that: there a chunk is as large as a bounded memory allows, 16 M
    pairs, 64 MiB per fp32 temporary with a handful alive at once. As a band holds at most
    ``_BLOCK_ELEMENTS`` pairs, a GPU takes each band in one chunk.
    """
    return _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _GPU_CHUNK_ELEMENTS


def _chunks(band: torch.Tensor, elements: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Slices of a contiguous band's rows holding about ``elements`` pairs (at least a row), flattened."""
    height, width = band.shape
    step = max(1, elements // max(1, width))
    for start in range(0, height, step):
        rows = slice(start, start + step)
        yield rows, band[rows].view(-1)


def _filled(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a vector of ``like``'s dtype and device, filled on the device: copying a host
    list there is a blocking copy, which waits for the device."""
    return torch.stack([like.new_full((), value) for value in values])


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
