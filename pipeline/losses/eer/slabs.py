"""One row block's slab of the Gram matrix: the distances it holds and the gradient it gives back.

Why: a loss over every pair that built an ``N × N × D`` tensor, or even an ``N × N`` matrix,
would run out of memory long before the batch sizes EERLoss is meant for. A block of batch rows
needs only its slab, ``B`` rows against the columns its rows pair with, computed from one Gram
block (a matmul over views of the rows, never copies); its owned pairs are a strided view of the
slab, its *band*. Backward fills a coefficient slab, per pair ``∂L/∂distance``, and two matmuls
turn it into the embeddings' gradient, so nothing per pair outlives its block.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

_EPS_SQUARED_DISTANCE = 1e-12  # keeps sqrt differentiable for coincident embeddings


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


class _GramSlabs:
    """The batch rows, and the memory rows, whose Gram blocks give every slab's distances:
    ``1 − x_i·x_j`` (cosine, unit rows) or ``√(|x_i|² + |x_j|² − 2 x_i·x_j)`` (Euclidean)."""

    def __init__(self, vectors: torch.Tensor, distance: str, memory_vectors: torch.Tensor) -> None:
        self.vectors, self.memory_vectors = vectors, memory_vectors
        self.norms = vectors.pow(2).sum(1) if distance == "euclidean" else None
        self.memory_norms = memory_vectors.pow(2).sum(1) if distance == "euclidean" else None
        self.min_distance = vectors.new_full((), _EPS_SQUARED_DISTANCE).sqrt_()  # where the clamp holds

    def distances(self, block: _Block) -> torch.Tensor:
        """The block's slab of distances, from its Gram block."""
        a, b = block[:2]
        rows = self.vectors[a:b]
        slab = rows.new_empty(b - a, block.columns)
        for columns in self._column_pieces(block):
            part = slab[:, columns.span]
            if columns.norms is None:
                part.fill_(1).addmm_(rows, columns.vectors.T, alpha=-1)
            else:
                assert self.norms is not None  # Euclidean: the rows carry norms as the columns do
                part.copy_(self.norms[a:b, None]).add_(columns.norms).addmm_(rows, columns.vectors.T, alpha=-2)
        return slab if self.norms is None else slab.clamp_min_(_EPS_SQUARED_DISTANCE).sqrt_()

    def per_gram_term(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A pair's coefficient in the slab given its ``weight`` ``∂L/∂distance`` and distance ``x``.

        Euclidean ``∂d/∂x_i = (x_i − x_j)/d``: the slab carries ``weight/d``, 0 where the clamp
        holds (there ``d − min`` is 0, elsewhere positive: its sign is a cheaper mask than a comparison).
        """
        if self.norms is None:
            return weight
        return weight.div_(x).mul_((x - self.min_distance).sign_())

    def accumulate(self, grad: torch.Tensor, block: _Block, slab: torch.Tensor) -> None:
        """Add ``Σ_j C_ij ∂d_ij/∂x`` of a coefficient slab ``C`` to the rows and the batch columns:
        ``−C x_j`` (+ ``Σ_j C_ij x_i`` for Euclidean)."""
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
                assert column_sums is not None  # summed above when Euclidean
                grad[columns.rows].addcmul_(column_sums[columns.span, None], columns.vectors)
        if euclidean:
            grad[a:b].addcmul_(slab.sum(1, keepdim=True), rows)

    def _column_pieces(self, block: _Block) -> list[_Columns]:
        """The block's slab columns in runs of consecutive rows: one run of memory rows, or the
        batch rows split where they wrap past N (the Gram blocks and the column gradients then
        use views of the rows, never copies)."""
        if isinstance(block, _MemoryBlock):
            memory = slice(block.start, block.stop)
            norms = None if self.memory_norms is None else self.memory_norms[memory]
            return [_Columns(0, self.memory_vectors[memory], norms, None)]
        pieces, offset, start, stop, n = [], 0, block.a + 1, block.b + block.width, len(self.vectors)
        while start < stop:
            end = min(stop, (start // n + 1) * n)
            rows = slice(start % n, start % n + end - start)
            pieces.append(_Columns(offset, self.vectors[rows], None if self.norms is None else self.norms[rows], rows))
            offset, start = offset + end - start, end
        return pieces


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
