"""EERLoss with its pairs sharded across gloo ranks trains exactly like one process holding the batch.

Each rank gathers the global batch, scores only the pairs its own rows own
(``rows=range(start, start + n_local)``), and the global sums are all-reduced; the loss value
must be the same on every rank and the parameter gradients, after the all-gather's backward
and data-parallel averaging, those of one process with the whole batch (float64, 1e-5). A
persistent threshold, carried from batch to batch, stays bit-identical on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from pipeline.distributed import gather_embeddings
from pipeline.losses.eer import EERLoss, EERStats
from pipeline.losses.fmr_band import FMRBandLoss
from tests.gloo_ranks import run_on_ranks
from tests.loopback import free_port
from tests.test_eer_blocks import reference_memory_loss

FEATURES, EMBEDDING = 5, 4
TOLERANCE = 1e-5
SPLITS = {1: (20,), 2: (13, 7), 3: (9, 4, 7)}  # unequal local batches of a 20-row global batch

CONFIGS = [
    {},
    {"variant": "direct"},
    {"distance": "cosine", "normalize": False},
    {"floor": "hard", "alpha": 0.1, "beta": 0.6},
    {"target": {"fmr": 0.1}},
    {"target": {"fnmr": 0.1}, "both_sides": True},
    {"target": {"fmr": 0.1}, "variant": "direct", "k": 3.0},  # k = 3: the search bins the impostors
    {"threshold_grad": "detached", "evaluate_at": "midpoint"},
    {"threshold_grad": "unrolled", "search_steps": 5},
    {"fmr_band": {"low": 0.1, "high": 0.4, "points": 4}},  # EERLoss at FMR 0.1 … 0.4, averaged
]


MEMORY_CONFIGS = [{}, {"target": {"fmr": 0.1}}]  # the EER target and an FMR target
PERSISTENT_CONFIGS = [{"target": {"fmr": 0.1}, "threshold_momentum": 0.5},
                      {"variant": "direct", "threshold_momentum": 0.9}]
BATCHES = (0, 1, 2)  # seeds of the consecutive global batches a persistent threshold follows
torch.serialization.add_safe_globals([EERStats])  # the ranks' results are loaded weights-only


def global_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """20 rows of 5 subjects in a shuffled order, so every rank holds genuine pairs of others."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(5).repeat(4)[torch.randperm(20, generator=generator)]
    features = torch.randn(20, FEATURES, generator=generator, dtype=torch.float64) + labels[:, None] * 0.3
    return features, labels


def memory_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """A cross-batch memory of 12 embeddings: 3 of the batch's subjects and 2 others."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2, 5, 6, 0, 1, 2, 5, 6, 0, 5])
    return torch.randn(12, EMBEDDING, generator=generator, dtype=torch.float64) + labels[:, None] * 0.2, labels


def criterion(config: dict) -> torch.nn.Module:
    """EERLoss with these options, or the FMR band they name (EERLoss at several points)."""
    return FMRBandLoss(**config["fmr_band"]) if "fmr_band" in config else EERLoss(**config)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 6), torch.nn.Tanh(), torch.nn.Linear(6, EMBEDDING)).double()


def train_step(features: torch.Tensor, labels: torch.Tensor, loss_fn: torch.nn.Module, rows: range | None, memory=None):
    """Gather, loss (sharded when ``rows`` is given), backward, average the gradients over ranks."""
    net = model()
    embeddings, global_labels = gather_embeddings(net(features), labels)
    loss, stats = loss_fn(embeddings, global_labels, return_stats=True, rows=rows, memory=memory)
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    if rows is not None:
        for grad in grads:
            dist.all_reduce(grad)
            grad /= dist.get_world_size()
    return loss.item(), grads, stats


def consecutive_steps(config: dict, rows: range | None) -> list:
    """One loss trained on each of the ``BATCHES`` in turn (this rank's ``rows`` of each, or
    all of them): (loss, gradients, stats, persistent threshold d̄) after every step."""
    loss_fn, steps = EERLoss(**config), []
    for seed in BATCHES:
        features, labels = global_batch(seed)
        mine = slice(None) if rows is None else slice(rows.start, rows.stop)
        steps.append((*train_step(features[mine], labels[mine], loss_fn, rows), loss_fn.running_threshold.value))
    return steps


def reference_step(features: torch.Tensor, labels: torch.Tensor, config: dict):
    """One process, the brute-force loss over the explicit list of batch and memory pairs."""
    net = model()
    loss, *_ = reference_memory_loss(EERLoss(**config), net(features), labels, *memory_rows())
    loss.backward()
    return loss.item(), [p.grad for p in net.parameters()]


def rank_main(rank: int, world: int) -> dict[str, list]:
    """This rank's results with its share of the global batch's rows, in every scenario: the
    pairs under every config, with a memory, and a persistent threshold over consecutive batches."""
    features, labels = global_batch()
    sizes = SPLITS[world]
    start = sum(sizes[:rank])
    rows = range(start, start + sizes[rank])
    mine = features[rows.start:rows.stop], labels[rows.start:rows.stop]
    return {
        "pairs": [train_step(*mine, criterion(config), rows) for config in CONFIGS],
        "memory": [train_step(*mine, criterion(config), rows, memory_rows()) for config in MEMORY_CONFIGS],
        "persistent": [consecutive_steps(config, rows) for config in PERSISTENT_CONFIGS],
    }


@pytest.fixture(scope="module", params=sorted(SPLITS))
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, list]]:
    """Every rank's results (loss, parameter gradients, stats) per scenario, on 1, 2 and 3 ranks:
    one spawn of the ranks per world size serves every specification (a spawn costs seconds),
    and the one rank of a world of 1 runs in this process."""
    world = request.param
    if world == 1:
        return [in_this_process(rank_main)]
    return run_on_ranks(rank_main, world, tmp_path_factory.mktemp(f"world{world}"))


def in_this_process(body: Callable[[int, int], dict[str, list]]) -> dict[str, list]:
    """``body(0, 1)`` as the only rank of a gloo process group in this process: spawning a rank
    would cost seconds (a fresh interpreter importing torch, sklearn and torch._dynamo)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MASTER_ADDR", "127.0.0.1")
        env.setenv("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            return body(0, 1)
        finally:
            dist.destroy_process_group()


def assert_same_gradients(rank_grads: list[torch.Tensor], grads: list[torch.Tensor], context: tuple) -> None:
    scale = max(grad.abs().max().item() for grad in grads)
    for rank_grad, grad in zip(rank_grads, grads, strict=True):
        torch.testing.assert_close(rank_grad, grad, rtol=TOLERANCE, atol=TOLERANCE * scale, msg=str(context))


def test_sharded_pairs_match_one_process_holding_the_global_batch(ranks: list[dict[str, list]]) -> None:
    features, labels = global_batch()
    for index, config in enumerate(CONFIGS):
        loss, grads, stats = train_step(features, labels, criterion(config), rows=None)
        for rank, results in enumerate(ranks):
            rank_loss, rank_grads, rank_stats = results["pairs"][index]
            assert rank_loss == pytest.approx(loss, rel=TOLERANCE), (config, rank)
            assert rank_stats.exact_eer == pytest.approx(stats.exact_eer)
            assert (rank_stats.genuine_pairs, rank_stats.impostor_pairs) == (stats.genuine_pairs, stats.impostor_pairs)
            assert rank_stats.threshold == pytest.approx(stats.threshold, rel=TOLERANCE)
            assert_same_gradients(rank_grads, grads, (config, rank))


def test_with_a_memory_each_rank_scores_its_rows_against_it_and_all_equal_the_explicit_pair_list(
    ranks: list[dict[str, list]],
) -> None:
    features, labels = global_batch()
    for index, config in enumerate(MEMORY_CONFIGS):
        loss, grads = reference_step(features, labels, config)
        for rank, results in enumerate(ranks):
            rank_loss, rank_grads, rank_stats = results["memory"][index]
            assert rank_loss == pytest.approx(loss, rel=TOLERANCE), (config, rank)
            assert rank_stats.genuine_pairs + rank_stats.impostor_pairs == 20 * 19 // 2 + 20 * 12
            assert_same_gradients(rank_grads, grads, (config, rank))


def test_a_persistent_threshold_stays_bit_identical_on_every_rank_and_trains_like_one_process(
    ranks: list[dict[str, list]],
) -> None:
    for index, config in enumerate(PERSISTENT_CONFIGS):
        for step, (loss, grads, stats, running) in enumerate(consecutive_steps(config, rows=None)):
            thresholds = {results["persistent"][index][step][3].item() for results in ranks}
            assert len(thresholds) == 1, (config, step)  # bit for bit
            assert (stats.threshold == stats.batch_threshold) == (step == 0)  # d̄ starts at d*, then lags it
            for rank, results in enumerate(ranks):
                rank_loss, rank_grads, rank_stats, rank_running = results["persistent"][index][step]
                context = (config, step, rank)
                assert rank_loss == pytest.approx(loss, rel=TOLERANCE), context
                assert rank_running.item() == pytest.approx(running.item(), rel=TOLERANCE), context
                assert rank_stats.threshold == rank_running.item(), context
                assert_same_gradients(rank_grads, grads, context)


def test_rows_without_a_process_group_are_refused() -> None:
    with pytest.raises(ValueError, match="process group"):
        EERLoss()(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), rows=range(0, 2))
