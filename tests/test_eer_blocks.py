"""Blocked EERLoss equals the all-pairs EERLoss it replaced: values, gradients and stats.

``reference_loss`` is a frozen, plain re-statement of EERLoss as it was before the pairs were
blocked (commit 2210267): every pair distance from one N×N Gram matrix and boolean masks, a hard
bisection on exact points or a 64-bins-per-1/k histogram, autograd through everything. The
blocked loss must match it to 1e-5 relative in float64 for every option.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import EERLoss
from pipeline.losses.eer import pairs as eer_module
from pipeline.metrics import eer as exact_eer

TOLERANCE = 1e-5


def reference_pairs(x: torch.Tensor, labels: torch.Tensor, distance: str) -> tuple[torch.Tensor, torch.Tensor]:
    upper = torch.ones(len(labels), len(labels), dtype=torch.bool).triu(1)
    same = labels[:, None] == labels[None, :]
    if distance == "cosine":
        unit = F.normalize(x, dim=1)
        dist = 1 - unit @ unit.T
    else:
        norms = x.pow(2).sum(1)
        dist = (norms[:, None] + norms[None, :] - 2 * x @ x.T).clamp_min(1e-12).sqrt()
    return dist[same & upper], dist[~same & upper]


def reference_memory_loss(
    loss: EERLoss, x: torch.Tensor, labels: torch.Tensor, memory: torch.Tensor, memory_labels: torch.Tensor
):
    """:func:`reference_loss` over an explicit pair list: every unordered pair of the batch, then
    every (batch row, memory row) pair, the memory a constant."""
    memory = memory.detach()
    if loss.normalize:
        x, memory = F.normalize(x, dim=1), F.normalize(memory, dim=1)
    if loss.distance == "cosine":
        x, memory = F.normalize(x, dim=1), F.normalize(memory, dim=1)
    n, m = len(labels), len(memory_labels)
    batch_pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    memory_pairs = [(i, j) for i in range(n) for j in range(m)]
    (left, right), (rows, slots) = (torch.tensor(pairs).T for pairs in (batch_pairs, memory_pairs))
    first, second = torch.cat([x[left], x[rows]]), torch.cat([x[right], memory[slots]])
    same = torch.cat([labels[left] == labels[right], labels[rows] == memory_labels[slots]])
    if loss.distance == "cosine":
        distances = 1 - (first * second).sum(1)
    else:
        distances = (first - second).pow(2).sum(1).clamp_min(1e-12).sqrt()
    return reference_loss_of_pairs(loss, distances[same], distances[~same])


def reference_rate(x: torch.Tensor, d: torch.Tensor, k: float, sign: float) -> torch.Tensor:
    return torch.tanh(k * ((x - d) * sign).clamp_min(0)).mean()


def reference_points(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, k: float):
    span = float(high - low)
    bins = math.ceil(span * k * 64) + 1
    if bins >= x.numel() or bins > 1 << 22:
        return x, torch.full_like(x, 1 / x.numel())
    width = span / (bins - 1)
    counts = torch.bincount(((x - low) / width).round().long(), minlength=bins).to(x.dtype)
    return low + width * torch.arange(bins, dtype=x.dtype), counts / x.numel()


def reference_equation(kind: str, rate: float, frr, far):
    return {"fmr": lambda: rate - far, "fnmr": lambda: frr - rate, "eer": lambda: frr - far}[kind]()


def reference_search(o: dict, genuine: torch.Tensor, impostor: torch.Tensor):
    """The hard bisection (no autograd) or the authors' smooth, differentiable one."""
    k, kind, rate = o["k"], o["kind"], o["rate"]
    if o["threshold_grad"] == "unrolled":
        left, right = 0.5 * genuine.mean(), 1.5 * impostor.mean()
        mid = (left + right) / 2
        for _ in range(o["search_steps"]):
            mid = (left + right) / 2
            frr, far = 100 * reference_rate(genuine, mid, k, 1), 100 * reference_rate(impostor, mid, k, -1)
            a, b = {"fmr": (100 * rate, far), "fnmr": (frr, 100 * rate), "eer": (frr, far)}[kind]
            a, b = torch.as_tensor(a, dtype=frr.dtype), torch.as_tensor(b, dtype=frr.dtype)
            top = torch.maximum(a, b)
            move_left, move_right = torch.exp(k * (a - top)), torch.exp(k * (b - top))
            left, right = left * (1 - move_left) + mid * move_left, right * (1 - move_right) + mid * move_right
        return (left + right) / 2, mid
    with torch.no_grad():
        g, i = genuine.detach(), impostor.detach()
        low, high = torch.minimum(g.min(), i.min()), torch.maximum(g.max(), i.max())
        (gp, gw), (ip, iw) = reference_points(g, low, high, k), reference_points(i, low, high, k)
        left, right = low.clone(), high.clone()
        mid = (left + right) / 2
        for _ in range(o["search_steps"]):
            mid = (left + right) / 2
            frr = (gw * torch.tanh(k * (gp - mid).clamp_min(0))).sum()
            far = (iw * torch.tanh(k * (mid - ip).clamp_min(0))).sum()
            too_low = reference_equation(kind, rate, frr, far) > 0
            left, right = torch.where(too_low, mid, left), torch.where(too_low, right, mid)
        return (left + right) / 2, mid


def reference_power_mean(o: dict, x: torch.Tensor) -> torch.Tensor:
    if o["floor"] == "softplus":
        x = o["tau"] * F.softplus(x / o["tau"])
    return x.clamp_min(o["eps"]).pow(o["beta"]).mean().pow(1 / o["beta"])


def reference_loss(loss: EERLoss, x: torch.Tensor, labels: torch.Tensor):
    """The pre-blocking EERLoss: (loss, threshold, soft FRR, soft FAR, exact EER)."""
    if loss.normalize:
        x = F.normalize(x, dim=1)
    return reference_loss_of_pairs(loss, *reference_pairs(x, labels, loss.distance))


def reference_loss_of_pairs(loss: EERLoss, genuine: torch.Tensor, impostor: torch.Tensor):
    """:func:`reference_loss` given the genuine and impostor distances of the scored pairs."""
    o = dict(vars(loss), kind=loss.target_kind, rate=loss.target_rate)
    threshold, mid = reference_search(o, genuine, impostor)
    at = mid if o["evaluate_at"] == "midpoint" else threshold
    frr, far = reference_rate(genuine, at, o["k"], 1), reference_rate(impostor, at, o["k"], -1)
    if o["threshold_grad"] == "implicit":
        at0 = at.detach().requires_grad_()
        with torch.enable_grad():
            frr0 = reference_rate(genuine.detach(), at0, o["k"], 1)
            far0 = reference_rate(impostor.detach(), at0, o["k"], -1)
            frr_slope, far_slope = torch.autograd.grad(frr0, at0)[0], torch.autograd.grad(far0, at0)[0]
        slope = reference_equation(o["kind"], 0.0, frr_slope, far_slope)  # dF/dd: the target is a constant
        equation = reference_equation(o["kind"], o["rate"], frr, far)
        shift = -(equation - equation.detach()) / slope if slope.abs() >= 1e-12 else 0 * equation
        at, frr, far = at + shift, frr + frr_slope * shift, far + far_slope * shift
    if o["variant"] == "direct":
        value = {"fmr": 100 * frr, "fnmr": 100 * far, "eer": 50 * (frr + far)}[o["kind"]]
    else:
        terms = []
        if o["kind"] != "fnmr" or o["both_sides"]:
            terms.append(reference_power_mean(o, (genuine - (1 - o["alpha"]) * at) / at))
        if o["kind"] != "fmr" or o["both_sides"]:
            terms.append(reference_power_mean(o, ((1 + o["alpha"]) * at - impostor) / at))
        value = 100 * sum(terms)
    scores = -torch.cat([genuine, impostor]).detach().numpy()
    truth = np.r_[np.ones(genuine.numel()), np.zeros(impostor.numel())]
    return value, float(at.detach()), float(frr.detach()), float(far.detach()), exact_eer(truth, scores)[0]


def clustered(seed: int, subjects: int = 10, per_subject: int = 6, dim: int = 5, spread: float = 0.9):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(subjects, dim, generator=generator, dtype=torch.float64)
    labels = torch.arange(subjects).repeat_interleave(per_subject)
    labels = labels[torch.randperm(len(labels), generator=generator)]
    x = centers[labels] + spread * torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)
    return x, labels


OPTIONS = [
    {},
    {"variant": "direct"},
    {"distance": "cosine"},
    {"normalize": False, "floor": "hard"},
    {"alpha": 0.1, "beta": 0.6, "tau": 0.1},
    {"target": {"fmr": 0.05}},
    {"target": {"fnmr": 0.1}, "variant": "direct"},
    {"target": {"fmr": 0.05}, "both_sides": True},
    {"target": {"fnmr": 0.1}, "both_sides": True, "distance": "cosine"},
    {"threshold_grad": "detached"},
    {"threshold_grad": "detached", "variant": "direct", "evaluate_at": "midpoint"},
    {"threshold_grad": "unrolled", "search_steps": 8},
    {"threshold_grad": "unrolled", "variant": "direct", "evaluate_at": "midpoint", "search_steps": 5},
    {"evaluate_at": "midpoint", "search_steps": 6},
]


def assert_same_as_reference(
    loss_fn: EERLoss, x: torch.Tensor, labels: torch.Tensor, stats_exact: bool,
    memory: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    x = x.clone().requires_grad_()
    value, stats = loss_fn(x, labels, return_stats=True, memory=memory)
    (gradient,) = torch.autograd.grad(value, x)
    if memory is None:
        expected, threshold, frr, far, eer = reference_loss(loss_fn, x, labels)
    else:
        expected, threshold, frr, far, eer = reference_memory_loss(loss_fn, x, labels, *memory)
    (expected_gradient,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(value, expected.detach(), rtol=TOLERANCE, atol=0)
    scale = expected_gradient.abs().max().item()
    torch.testing.assert_close(gradient, expected_gradient, rtol=TOLERANCE, atol=TOLERANCE * scale)
    assert stats.threshold == pytest.approx(threshold, rel=TOLERANCE)
    assert (stats.soft_frr, stats.soft_far) == pytest.approx((frr, far), rel=TOLERANCE, abs=1e-12)
    if stats_exact:
        assert stats.exact_eer == eer


@pytest.mark.parametrize("k", [100.0, 3.0])  # 100: exact points; 3: impostors binned (bins < pairs)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_blocked_loss_equals_the_all_pairs_reference(options: dict, k: float) -> None:
    x, labels = clustered(seed=len(str(options)))
    assert_same_as_reference(EERLoss(k=k, **options), x, labels, stats_exact=k == 100.0)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("n_subjects, per_subject", [(9, 7), (8, 8)])  # N odd and even
@pytest.mark.parametrize(
    "options",
    [{}, {"variant": "direct", "target": {"fmr": 0.05}}, {"threshold_grad": "unrolled", "search_steps": 4}],
    ids=str,
)
def test_many_small_blocks_with_or_without_kept_distances_change_nothing(
    monkeypatch: pytest.MonkeyPatch, options: dict, n_subjects: int, per_subject: int, cache: bool
) -> None:
    monkeypatch.setattr(eer_module, "_BLOCK_ELEMENTS", 97)  # blocks of 2-3 rows
    monkeypatch.setattr(eer_module, "_CACHE_BYTES", eer_module._CACHE_BYTES if cache else 0)
    x, labels = clustered(seed=n_subjects, subjects=n_subjects, per_subject=per_subject)
    assert len(eer_module._row_blocks(range(len(labels)), len(labels))) > 10
    assert_same_as_reference(EERLoss(**options), x, labels, stats_exact=True)


@pytest.mark.parametrize("n", [3, 4, 5, 11, 12])
def test_every_unordered_pair_is_owned_exactly_once_and_rows_own_equal_shares(
    monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    monkeypatch.setattr(eer_module, "_BLOCK_ELEMENTS", 5)
    labels = 2 * torch.arange(n) // n
    x = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    pairs = eer_module._PairSet(x, labels, range(n), "euclidean", eer_module._Collective())
    owners, owned, genuine = [], [], []
    for block, (band, _), where in zip(pairs.blocks, pairs.bands(), pairs._genuine, strict=True):
        for i, j in np.ndindex(*band.shape):  # band[i, j]: row a + i with the row j + 1 after it
            row, column = block.a + i, (block.a + i + j + 1) % n
            assert band[i, j] == pytest.approx(float((x[row] - x[column]).norm()))
            owners.append(row)
            owned.append(tuple(sorted((row, column))))
        genuine += [owned[len(owned) - band.numel() + i * band.shape[1] + j] for i, j in zip(*where)]
    every_pair = [(i, j) for i in range(n) for j in range(i + 1, n)]
    assert sorted(owned) == every_pair
    assert sorted(genuine) == [(i, j) for i, j in every_pair if labels[i] == labels[j]]
    shares = torch.bincount(torch.tensor(owners), minlength=n)
    assert shares.max() - shares.min() <= 1


def test_the_block_size_adapts_to_n_and_bounds_each_slab() -> None:
    for n in (64, 8191, 8192, 65536):
        blocks = eer_module._row_blocks(range(n), n)
        assert all((block.b - block.a) * block.columns <= eer_module._BLOCK_ELEMENTS for block in blocks)
        assert all(block.b - block.a <= n // 2 * eer_module._ROWS_PER_BAND_WIDTH for block in blocks)
        assert [block.a for block in blocks] == [0] + [block.b for block in blocks[:-1]]
        assert blocks[-1].b == n
        # For even N, rows from N/2 on own one pair fewer: no block spans N/2.
        assert all(block.width == n // 2 - (n % 2 == 0 and block.a >= n // 2) for block in blocks)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize(
    "options", [{}, {"distance": "cosine", "target": {"fmr": 0.05}}, {"threshold_grad": "unrolled", "search_steps": 4}],
    ids=str,
)
def test_a_memory_adds_every_batch_row_memory_row_pair_in_small_blocks(
    monkeypatch: pytest.MonkeyPatch, options: dict, cache: bool
) -> None:
    monkeypatch.setattr(eer_module, "_BLOCK_ELEMENTS", 29)  # several memory blocks per row and per column
    monkeypatch.setattr(eer_module, "_CACHE_BYTES", eer_module._CACHE_BYTES if cache else 0)
    x, labels = clustered(seed=1, subjects=6, per_subject=3)
    memory, memory_labels = clustered(seed=2, subjects=8, per_subject=5)
    assert len(eer_module._memory_blocks(range(len(labels)), len(memory_labels))) > 10
    assert_same_as_reference(EERLoss(**options), x, labels, stats_exact=True, memory=(memory, memory_labels))
