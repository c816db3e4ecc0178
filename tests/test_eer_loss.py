"""EERLoss: what the surrogate promises, checked against exact computations."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.losses import EERLoss, pair_distances
from pipeline.metrics import eer as exact_eer


def clustered_batch(seed: int, subjects: int = 24, per_subject: int = 6, spread: float = 0.7, dim: int = 8):
    """Subjects as noisy clusters; ``spread`` sets how much genuine and impostor distances overlap."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(subjects, dim, generator=generator, dtype=torch.float64)
    labels = torch.arange(subjects).repeat_interleave(per_subject)
    embeddings = centers[labels] + spread * torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)
    return embeddings.requires_grad_(), labels


def batch_eer(embeddings: torch.Tensor, labels: torch.Tensor, distance: str = "euclidean") -> float:
    genuine, impostor = pair_distances(embeddings.detach(), labels, distance)
    scores = -torch.cat([genuine, impostor]).numpy()
    truth = np.r_[np.ones(genuine.numel()), np.zeros(impostor.numel())]
    return exact_eer(truth, scores)[0]


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.floats(0.3, 1.2), distance=st.sampled_from(["euclidean", "cosine"]))
def test_direct_variant_converges_to_the_exact_batch_eer(seed, spread, distance):
    # Documented setting: k = 5000 (1/distance), 40 search steps, ~1,700 genuine pairs.
    embeddings, labels = clustered_batch(seed, subjects=48, per_subject=10, spread=spread)
    loss = EERLoss(variant="direct", distance=distance, k=5000, search_steps=40, normalize=False)(embeddings, labels)
    assert abs(loss.item() - 100 * batch_eer(embeddings, labels, distance)) <= 0.1


@pytest.mark.parametrize("threshold_grad", ["implicit", "unrolled", "detached"])
@pytest.mark.parametrize("variant", ["area", "direct"])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_gradients_are_finite_and_nonzero_where_distributions_overlap(threshold_grad, variant, distance):
    embeddings, labels = clustered_batch(seed=1, spread=1.0)
    loss = EERLoss(variant=variant, distance=distance, threshold_grad=threshold_grad)(embeddings, labels)
    (gradient,) = torch.autograd.grad(loss, embeddings)
    assert torch.isfinite(loss) and torch.isfinite(gradient).all()
    assert gradient.abs().sum() > 0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), variant=st.sampled_from(["area", "direct"]))
def test_permuting_the_batch_changes_nothing(seed, variant):
    embeddings, labels = clustered_batch(seed, spread=0.9)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    loss_fn = EERLoss(variant=variant)
    loss = loss_fn(embeddings, labels)
    (gradient,) = torch.autograd.grad(loss, embeddings)
    permuted = embeddings.detach()[order].requires_grad_()
    permuted_loss = loss_fn(permuted, labels[order])
    (permuted_gradient,) = torch.autograd.grad(permuted_loss, permuted)
    torch.testing.assert_close(permuted_loss, loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(permuted_gradient, gradient[order], rtol=1e-6, atol=1e-9)


def test_each_unordered_pair_counts_once_with_any_labels_in_any_order():
    labels = torch.tensor([7, 3, 7, 9, 3, 3, 42, 7, 9, 9, 9])  # unequal sessions, unsorted ids
    embeddings = torch.randn(len(labels), 4, generator=torch.Generator().manual_seed(0))
    genuine, impostor = pair_distances(embeddings, labels)
    pairs = list(itertools.combinations(range(len(labels)), 2))
    expected_genuine = sorted(
        torch.dist(embeddings[i], embeddings[j]).item() for i, j in pairs if labels[i] == labels[j]
    )
    expected_impostor = sorted(
        torch.dist(embeddings[i], embeddings[j]).item() for i, j in pairs if labels[i] != labels[j]
    )
    np.testing.assert_allclose(sorted(genuine.tolist()), expected_genuine, rtol=1e-5)
    np.testing.assert_allclose(sorted(impostor.tolist()), expected_impostor, rtol=1e-5)
    _, stats = EERLoss()(embeddings, labels, return_stats=True)
    assert (stats.genuine_pairs, stats.impostor_pairs) == (len(expected_genuine), len(expected_impostor))


@pytest.mark.parametrize(
    "labels, missing",
    [([0, 1, 2, 3], "genuine"), ([5, 5, 5, 5], "impostor"), ([1], "genuine")],
)
def test_a_batch_without_genuine_or_impostor_pairs_is_refused(labels, missing):
    with pytest.raises(ValueError, match="at least one genuine and one impostor pair"):
        EERLoss()(torch.randn(len(labels), 3), torch.tensor(labels))


@pytest.mark.parametrize("target", [{"fmr": 0.01}, {"fmr": 0.05}, {"fnmr": 0.05}])
def test_operating_point_targets_land_at_the_requested_rate(target):
    embeddings, labels = clustered_batch(seed=3, subjects=60, per_subject=8, spread=1.0)
    (kind, rate), = target.items()
    _, stats = EERLoss(variant="direct", k=5000, search_steps=40, target=target, normalize=False)(
        embeddings, labels, return_stats=True
    )
    genuine, impostor = pair_distances(embeddings.detach(), labels)
    soft = stats.soft_far if kind == "fmr" else stats.soft_frr
    hard = ((impostor <= stats.threshold).double().mean() if kind == "fmr"
            else (genuine > stats.threshold).double().mean())
    assert soft == pytest.approx(rate, abs=2e-3)
    assert hard.item() == pytest.approx(rate, abs=2e-3)


def test_fmr_target_loss_is_the_soft_fnmr_at_that_threshold():
    embeddings, labels = clustered_batch(seed=4, spread=1.0)
    loss, stats = EERLoss(variant="direct", target={"fmr": 0.01})(embeddings, labels, return_stats=True)
    assert loss.item() == pytest.approx(100 * stats.soft_frr)


def test_an_operating_point_area_loss_keeps_one_side_unless_asked_for_both():
    embeddings, labels = clustered_batch(seed=4, spread=1.0)
    target = {"fmr": 0.01}
    one_side = EERLoss(target=target)(embeddings, labels)
    both = EERLoss(target=target, both_sides=True)(embeddings, labels)
    assert both > one_side > 0
    with torch.no_grad():  # the difference is the impostor term at the FMR target's threshold
        _, stats = EERLoss(target=target)(embeddings, labels, return_stats=True)
        _, impostor = pair_distances(torch.nn.functional.normalize(embeddings, dim=1), labels)
        d = torch.tensor(stats.threshold, dtype=impostor.dtype)
        softplus_floor = 0.05 * torch.nn.functional.softplus((d - impostor) / d / 0.05)  # tau = 0.05
        impostor_term = 100 * softplus_floor.clamp_min(1e-7).pow(0.85).mean().pow(1 / 0.85)
    torch.testing.assert_close(both, one_side + impostor_term)


def test_stats_report_threshold_soft_rates_and_exact_eer():
    embeddings, labels = clustered_batch(seed=5, spread=0.8)
    loss, stats = EERLoss(variant="direct", normalize=False)(embeddings, labels, return_stats=True)
    assert stats.exact_eer == pytest.approx(batch_eer(embeddings, labels))
    assert loss.item() == pytest.approx(100 * (stats.soft_far + stats.soft_frr) / 2)
    assert stats.soft_far == pytest.approx(stats.soft_frr, abs=2e-3)  # d* sits at the EER point
    assert stats.threshold > 0


def soft_rate(x: torch.Tensor, d: torch.Tensor, k: float, sign: float) -> torch.Tensor:
    """Plain mean of tanh(k · max(0, sign·(x − d))): the soft FRR (sign +1) or FAR (sign −1)."""
    return torch.tanh(k * ((x - d) * sign).clamp_min(0)).mean()


def exact_root_loss(embeddings: torch.Tensor, labels: torch.Tensor, k: float) -> torch.Tensor:
    """Direct EER loss at the root of FRR_s = FAR_s found by a 80-step exact bisection."""
    genuine, impostor = pair_distances(embeddings, labels)
    low, high = torch.minimum(genuine.min(), impostor.min()), torch.maximum(genuine.max(), impostor.max())
    with torch.no_grad():
        for _ in range(80):
            mid = (low + high) / 2
            frr, far = soft_rate(genuine, mid, k, 1.0), soft_rate(impostor, mid, k, -1.0)
            low, high = (mid, high) if frr > far else (low, mid)
    d = (low + high) / 2
    return 50 * (soft_rate(genuine, d, k, 1.0) + soft_rate(impostor, d, k, -1.0))


def test_implicit_threshold_gradient_is_the_derivative_of_the_exact_root():
    embeddings, labels = clustered_batch(seed=6, subjects=6, per_subject=4, spread=1.0, dim=3)
    loss = EERLoss(variant="direct", k=5, search_steps=60, normalize=False)(embeddings, labels)
    (gradient,) = torch.autograd.grad(loss, embeddings)
    numeric = torch.zeros_like(embeddings)
    step = 1e-6
    with torch.no_grad():
        for index in range(embeddings.numel()):
            delta = torch.zeros(embeddings.numel(), dtype=embeddings.dtype)
            delta[index] = step
            delta = delta.view_as(embeddings)
            numeric.view(-1)[index] = (
                exact_root_loss(embeddings + delta, labels, 5) - exact_root_loss(embeddings - delta, labels, 5)
            ) / (2 * step)
    torch.testing.assert_close(gradient, numeric, rtol=0, atol=0.01 * numeric.abs().max().item())


def test_unrolled_gradient_is_exact_autograd_of_the_smooth_search():
    embeddings, labels = clustered_batch(seed=7, subjects=5, per_subject=4, spread=1.0, dim=3)
    loss_fn = EERLoss(variant="area", k=5, search_steps=20, threshold_grad="unrolled")
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, labels), (embeddings,), eps=1e-6, atol=1e-4)


def authors_area_loss(embeddings, labels, k=100.0, steps=16, alpha=0.0, beta=0.85, eps=1e-7):
    """The authors' algorithm as docs/design.md §5 describes it, written plainly (N×N×D, loops)."""
    n = len(labels)
    distances = (embeddings[:, None, :] - embeddings[None, :, :]).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    genuine = torch.stack([distances[i, j] for i in range(n) for j in range(i + 1, n) if labels[i] == labels[j]])
    impostor = torch.stack([distances[i, j] for i in range(n) for j in range(i + 1, n) if labels[i] != labels[j]])
    frr = lambda d: 100 * torch.tanh(k * (genuine - d).clamp_min(0)).mean()  # noqa: E731
    far = lambda d: 100 * torch.tanh(k * (d - impostor).clamp_min(0)).mean()  # noqa: E731
    left, right = 0.5 * genuine.mean(), 1.5 * impostor.mean()
    for _ in range(steps):
        d = (left + right) / 2
        top = torch.maximum(frr(d), far(d))
        c_left, c_right = torch.exp(k * (frr(d) - top)), torch.exp(k * (far(d) - top))
        left = left * (1 - c_left) + d * c_left
        right = right * (1 - c_right) + d * c_right
    d = (left + right) / 2
    genuine_term = ((genuine - (1 - alpha) * d) / d).clamp_min(eps).pow(beta).mean().pow(1 / beta)
    impostor_term = (((1 + alpha) * d - impostor) / d).clamp_min(eps).pow(beta).mean().pow(1 / beta)
    return 100 * (genuine_term + impostor_term)


def test_unrolled_mode_reproduces_the_authors_area_loss_and_gradients():
    embeddings, labels = clustered_batch(seed=8, subjects=6, per_subject=5, spread=0.8)
    ours = EERLoss(threshold_grad="unrolled", normalize=False, floor="hard")(embeddings, labels)
    theirs = authors_area_loss(embeddings, labels)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, embeddings)[0], torch.autograd.grad(theirs, embeddings)[0])


def test_midpoint_switch_evaluates_where_the_authors_code_does():
    embeddings, labels = clustered_batch(seed=9, spread=0.8)
    at_threshold = EERLoss(variant="direct", threshold_grad="unrolled", search_steps=3)(embeddings, labels)
    at_midpoint = EERLoss(variant="direct", threshold_grad="unrolled", search_steps=3, evaluate_at="midpoint")(
        embeddings, labels
    )
    assert at_threshold.item() != pytest.approx(at_midpoint.item())


def test_training_with_eer_loss_separates_subjects():
    torch.manual_seed(0)
    embeddings, labels = clustered_batch(seed=10, spread=1.5, dim=16)
    model = torch.nn.Linear(16, 8, dtype=torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = EERLoss()
    # Measured in the loss's own geometry: the default normalises, so directions are what it separates.
    before = batch_eer(model(embeddings), labels, "cosine")
    for _ in range(40):
        optimizer.zero_grad()
        loss_fn(model(embeddings.detach()), labels).backward()
        optimizer.step()
    assert batch_eer(model(embeddings), labels, "cosine") < 0.7 * before


def test_normalize_compares_directions_only():
    embeddings, labels = clustered_batch(seed=11, spread=0.8)
    scale = torch.rand(len(labels), 1, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 10 + 0.1
    loss_fn = EERLoss(normalize=True)
    torch.testing.assert_close(loss_fn(embeddings * scale, labels), loss_fn(embeddings, labels))
    unit = torch.nn.functional.normalize(embeddings.detach(), dim=1)
    torch.testing.assert_close(loss_fn(embeddings, labels), EERLoss(normalize=False)(unit, labels))


def separable_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Every genuine distance below every impostor distance: the batch EER is exactly 0."""
    embeddings, labels = clustered_batch(seed=12, subjects=8, per_subject=4, spread=0.05)
    assert batch_eer(embeddings, labels) == 0
    return embeddings, labels


def test_hard_floor_starves_a_separable_batch_and_the_softplus_floor_does_not():
    # With the hard floor only the pair d* lands on (the hardest genuine one) keeps a trace of gradient.
    embeddings, labels = separable_batch()
    (hard,) = torch.autograd.grad(EERLoss(normalize=False, floor="hard")(embeddings, labels), embeddings)
    (smooth,) = torch.autograd.grad(EERLoss(normalize=False, floor="softplus", tau=0.05)(embeddings, labels),
                                    embeddings)
    assert torch.isfinite(smooth).all()
    assert smooth.abs().max() > 1000 * hard.abs().max()


def test_softplus_floor_approaches_the_hard_floor_as_tau_shrinks():
    embeddings, labels = clustered_batch(seed=13, spread=1.0)
    hard = EERLoss(alpha=0.1, normalize=False, floor="hard")(embeddings, labels).item()
    gaps = [abs(EERLoss(alpha=0.1, normalize=False, floor="softplus", tau=tau)(embeddings, labels).item() - hard)
            for tau in (0.1, 0.01, 0.001)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.01 * hard


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variant": "hinge"}, "variant"),
        ({"distance": "manhattan"}, "distance"),
        ({"target": {"fmr": 2}}, "target"),
        ({"target": "auc"}, "target"),
        ({"beta": 2.5}, "beta"),
        ({"threshold_grad": "magic"}, "threshold_grad"),
        ({"floor": "smooth"}, "floor"),
        ({"tau": 0.0}, "tau"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EERLoss(**kwargs)


MEMORY_PROBE = """
import resource, torch
from pipeline.losses import EERLoss
x = torch.randn(8192, 256, requires_grad=True)
labels = torch.arange(1024).repeat_interleave(8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
EERLoss()(x, labels).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.slow
def test_a_batch_of_8192_runs_forward_and_backward_in_under_half_a_gb():
    peak_mb = float(subprocess.run([sys.executable, "-c", MEMORY_PROBE], check=True, capture_output=True,
                                   text=True).stdout)
    assert peak_mb < 500
