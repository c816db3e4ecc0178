"""Specification: one EERLoss forward + backward reads values back from the device a fixed, small
number of times, whatever the batch size and however many row blocks and chunks it visits.

On a GPU the host queues kernels ahead of the device until it needs a value back, and each such
read waits for all the work queued so far: a read per search step, per block or per chunk makes a
step wait on the host instead of the device. The CPU profiler shows these reads as ops:
``aten::_local_scalar_dense`` (a tensor read as a Python number: ``.item()``, ``float(t)``,
``int(t)``, ``bool(t)``, and the output size ``repeat_interleave`` computes), ``aten::nonzero``
(a boolean-mask selection, whose size is data) and ``aten::bincount`` (reads its largest value on
a GPU). ``.tolist()`` and blocking host-to-device copies do not show on the CPU; the loss makes a
fixed few of those too (``pipeline/losses/eer/__init__.py``, "Host waits").
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.losses import EERLoss
from pipeline.losses.eer import pairs as eer_module
from pipeline.losses.fmr_band import FMRBandLoss

DEVICE_READS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::bincount")
MOST_READS = 6  # finding the genuine pairs: 2 per pool of columns (batch, memory); the search grid's size: 1
SIZES = (512, 2048)  # 8 and 32 chunks of 64 K pairs; 8 and 36 row blocks of SMALL_BLOCKS pairs
SMALL_BLOCKS = 1 << 16  # pairs per block in the many-blocks cases (default 2 M)
SESSIONS = 8

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` embeddings of ``n / 8`` subjects with 8 sessions each (the benchmark's layout)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n // SESSIONS).repeat_interleave(SESSIONS)
    return torch.randn(n, 16, generator=generator).requires_grad_(), labels


def with_memory(loss: EERLoss) -> Loss:
    """``loss`` with a cross-batch memory of 512 earlier rows (32 subjects, some of them the batch's)."""
    memory, memory_labels = batch(512, seed=1)
    return lambda x, labels: loss(x, labels, memory=(memory.detach(), memory_labels + 16))


def rank_share(loss: EERLoss) -> Loss:
    """The pairs that rank 0 of 4 scores with ``rows=`` (its rows' pairs; the all-reduces left out)."""
    return lambda x, labels: loss._loss(x, labels, False, range(len(labels) // 4), eer_module._Collective())


CASES: dict[str, Callable[[], Loss]] = {
    "default": EERLoss,
    "fmr band": FMRBandLoss,
    "memory": lambda: with_memory(EERLoss()),
    "rank share": lambda: rank_share(EERLoss()),
}


def device_reads(loss: Loss, n: int) -> int:
    """How many values one forward + backward of ``loss`` at batch size ``n`` reads back from the device."""
    x, labels = batch(n)
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        loss(x, labels).backward()
    # the profiler's own records of the ops: profiled.events() would first build them into a tree
    # of Python objects, 10 to 50 times the loss's own time
    return sum(event.name() in DEVICE_READS for event in profiled.profiler.kineto_results.events())


@pytest.mark.parametrize("case", CASES)
def test_a_forward_and_backward_read_the_device_a_fixed_few_times_at_any_batch_size(case: str) -> None:
    reads = [device_reads(CASES[case](), n) for n in SIZES]
    assert reads[0] == reads[1] <= MOST_READS, f"device reads at N = {SIZES}: {reads}"


@pytest.mark.parametrize("case", ["default", "memory"])
def test_the_reads_do_not_grow_with_the_number_of_row_blocks(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    monkeypatch.setattr(eer_module, "_BLOCK_ELEMENTS", SMALL_BLOCKS)
    blocks = [len(eer_module._row_blocks(range(n), n)) for n in SIZES]
    assert blocks[1] > 4 * blocks[0]  # and 4 → 16 memory blocks
    reads = [device_reads(CASES[case](), n) for n in SIZES]
    assert reads[0] == reads[1] <= MOST_READS, f"device reads at N = {SIZES} ({blocks} row blocks): {reads}"


def test_chunks_are_cache_sized_on_a_cpu_and_whole_bands_on_a_gpu() -> None:
    assert eer_module._chunk_elements(torch.device("cpu")) == 1 << 16
    assert eer_module._chunk_elements(torch.device("cuda")) >= eer_module._BLOCK_ELEMENTS
