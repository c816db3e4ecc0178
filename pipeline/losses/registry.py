"""Losses by name, so a training config picks ``loss.name``; every one is a :class:`Criterion`
called as ``loss(embeddings [N, D], labels [N]) → scalar``, or with ``return_stats=True`` as
``→ (scalar, {name: value})``: the batch statistics a loss has (EERLoss: ``threshold``,
``batch_threshold``, ``soft_far``, ``soft_frr``, ``batch_eer``; the others none), so training
logs whatever a loss reports without knowing which loss it is.

State across steps: an EERLoss with a persistent threshold (``threshold_momentum``) carries a
:class:`~pipeline.losses.eer.RunningThreshold`, which :func:`running_threshold_of` finds in a
loss or a sum, for the checkpoint to save.

Pair sharding: given ``rows`` (this rank's rows of the gathered global batch) and ``group``, a
loss that can shard its pairs across ranks scores only this rank's share of them
(:class:`~pipeline.losses.eer.EERLoss`: each unordered pair on exactly one rank, global sums
all-reduced, value and gradients those of one process holding the batch); every other loss
ignores them and computes the whole batch on every rank (replicated), which is also exact.
Today only ``eer`` and ``fmr_band`` (EERLoss at several operating points) shard — the
pytorch-metric-learning losses, Set2set and the classifiers are replicated; in a sum, each term
does what it can.

Cross-batch memory: given ``memory=(embeddings [M, D], labels [M])`` of earlier batches
(``pipeline/training/memory.py``), a loss that can take it (:data:`MEMORY_LOSSES`) also scores
every pair (batch row, memory row), the memory a constant. EERLoss adds the memory pairs to its
pair set; the pytorch-metric-learning losses take the batch and the memory together as their
references (``ref_emb``), with every anchor's comparison with itself removed (the library's
``CrossBatchMemory`` semantics; unlike it, the batch's own pairs keep their gradient on both
sides, so an empty memory is exactly the loss without one). Set2set and the classifiers cannot
take a memory: their terms are sets or class weights, not pairs.

Classification-style losses (``arcface``, ``cosface``) hold a class-weight matrix as module
parameters: optimise ``loss.parameters()`` together with the model's. Their ``num_classes`` is
the number of training subjects (``SubjectBatchLoader.num_classes``; labels are global).

Losses add up with ``+``: ``build_loss("eer+multisimilarity", D, eer={...},
multisimilarity={...}, weights={"multisimilarity": 2.0})`` is the weighted sum of the two (each
term's options under its own name, weights default to 1): the EER surrogate with a dense
metric-learning term beside it (issue 8); ``eer+subject_eer`` adds every subject's own EER
surrogate to the global one (:mod:`pipeline.losses.subject_eer`).

``fmr_band`` trains for a low-FMR band rather than one point: EERLoss's FNMR averaged over
FMR targets spread across ``[low, high]`` (:mod:`pipeline.losses.fmr_band`); its run's
checkpoints are selected by the FNMR at ``low``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import loss_and_miner_utils
from torch import nn

from pipeline.losses.eer import EERLoss, EERStats, Memory, RunningThreshold
from pipeline.losses.fmr_band import FMRBandLoss
from pipeline.losses.set2set import Set2SetLoss
from pipeline.losses.subject_eer import SubjectEERLoss

Stats = dict[str, float]


@dataclass(frozen=True)
class PairShard:
    """This rank's rows of the gathered global batch, and the ranks that share its pairs."""

    rows: range
    group: Any = None  # a torch.distributed process group; None: the default one


class Criterion(nn.Module):
    """A loss with the registry's calling convention; ``stats`` turns the statistics of a loss
    that has some (called with ``return_stats=True``) into named values; ``shardable`` says
    whether the loss takes a :class:`PairShard` (``rows=``, ``group=``), ``takes_memory``
    whether it takes a cross-batch ``memory=``."""

    def __init__(
        self, loss: nn.Module, stats: Callable[[Any], Stats] | None = None, shardable: bool = False,
        takes_memory: bool = False,
    ) -> None:
        super().__init__()
        self.loss, self.stats, self.shardable, self.takes_memory = loss, stats, shardable, takes_memory

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, return_stats: bool = False,
        shard: PairShard | None = None, memory: Memory | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Stats]:
        options = {"rows": shard.rows, "group": shard.group} if shard is not None and self.shardable else {}
        if memory is not None:
            if not self.takes_memory:
                raise ValueError(
                    f"{type(self.loss).__name__} cannot take a cross-batch memory; these losses can: {MEMORY_LOSSES}"
                )
            options["memory"] = memory
        if not return_stats:
            return self.loss(embeddings, labels, **options)
        if self.stats is None:
            return self.loss(embeddings, labels, **options), {}
        value, raw = self.loss(embeddings, labels, return_stats=True, **options)
        return value, self.stats(raw)


def _eer_stats(stats: EERStats) -> Stats:
    return {"threshold": stats.threshold, "batch_threshold": stats.batch_threshold, "soft_far": stats.soft_far,
            "soft_frr": stats.soft_frr, "batch_eer": stats.exact_eer}


def running_threshold_of(criterion: nn.Module) -> RunningThreshold | None:
    """The persistent threshold of the loss's EERLoss (itself or a term of a sum), or ``None``."""
    thresholds = [m.running_threshold for m in criterion.modules() if isinstance(m, EERLoss)]
    return next((threshold for threshold in thresholds if threshold is not None), None)


def threshold_resume_problem(saved: Mapping[str, Any], momentum: float) -> str | None:
    """Why a checkpoint's parts cannot continue a loss whose threshold has ``momentum`` (``None``:
    they can): a persistent threshold continues only from a checkpoint that saved one, and a
    checkpoint that saved one continues only with one. The momentum itself may change on a
    relaunch, like the learning rate: d̄ continues from its saved value at the new rate."""
    theirs, mine = "threshold" in saved, bool(momentum)
    if theirs == mine:
        return None
    return (f"saved {'with' if theirs else 'without'} a persistent threshold (threshold_momentum > 0), "
            f"this run has {'one' if mine else 'none'}")


def _eer(**kwargs: Any) -> Criterion:
    return Criterion(EERLoss(**kwargs), _eer_stats, shardable=True, takes_memory=True)


def _fmr_band(**kwargs: Any) -> Criterion:
    return Criterion(FMRBandLoss(**kwargs), _eer_stats, shardable=True, takes_memory=True)


def _plain(loss: Callable[..., nn.Module]) -> Callable[..., Criterion]:
    """A loss without statistics, as a :class:`Criterion`."""
    return lambda **kwargs: Criterion(loss(**kwargs))


def _metric(loss: Callable[..., nn.Module]) -> Callable[..., Criterion]:
    """A pytorch-metric-learning pair or triplet loss, as a :class:`Criterion` that takes a memory."""
    return lambda **kwargs: Criterion(MetricLoss(loss(**kwargs)), takes_memory=True)


class MetricLoss(nn.Module):
    """A pytorch-metric-learning loss, on the tuples its miner selects if it has one, scoring the
    batch's rows against the batch and, if given, a cross-batch memory."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None) -> None:
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, memory: Memory | None = None) -> torch.Tensor:
        if memory is None:
            return self.loss(embeddings, labels, self.miner(embeddings, labels) if self.miner else None)
        references = torch.cat([embeddings, memory[0].detach().to(embeddings.dtype)])
        reference_labels = torch.cat([labels, memory[1]])
        if self.miner:
            tuples = self.miner(embeddings, labels, references, reference_labels)
        else:
            tuples = loss_and_miner_utils.get_all_pairs_indices(labels, reference_labels)
        return self.loss(embeddings, labels, _without_self_comparisons(tuples), references, reference_labels)


def _without_self_comparisons(tuples: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)`` without an anchor paired with itself as
    its own positive (the references start with the batch, so that is ``p == a``)."""
    anchors, positives, *rest = tuples
    kept = anchors != positives
    if len(tuples) == 3:
        return anchors[kept], positives[kept], rest[0][kept]
    return anchors[kept], positives[kept], *rest


def _triplet(margin: float = 0.2, **kwargs: Any) -> nn.Module:
    miner = miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")
    return Criterion(MetricLoss(losses.TripletMarginLoss(margin=margin, **kwargs), miner), takes_memory=True)


def _triplet_all(margin: float = 0.2, **kwargs: Any) -> nn.Module:
    """Every valid triplet of the batch on L2-normalised embeddings: the strongest baseline of
    docs/archive/research-notes.md (the semi-hard miner finds too few triplets in small batches)."""
    return _metric(losses.TripletMarginLoss)(margin=margin, **kwargs)


def _classifier(loss: type[nn.Module]) -> Callable[..., nn.Module]:
    def build(embedding_size: int, num_classes: int | None, **kwargs: Any) -> nn.Module:
        if num_classes is None:
            raise ValueError(f"{loss.__name__} needs num_classes: the number of training subjects")
        return Criterion(loss(num_classes=num_classes, embedding_size=embedding_size, **kwargs))

    return build


_PAIR_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "eer": _eer,
    "fmr_band": _fmr_band,
    "subject_eer": _plain(SubjectEERLoss),
    "set2set": _plain(Set2SetLoss),
    "triplet": _triplet,
    "triplet_all": _triplet_all,
    "contrastive": _metric(losses.ContrastiveLoss),
    "multisimilarity": _metric(losses.MultiSimilarityLoss),
    "supcon": _metric(losses.SupConLoss),
}
_CLASS_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "arcface": _classifier(losses.ArcFaceLoss),
    "cosface": _classifier(losses.CosFaceLoss),
}
LOSSES: tuple[str, ...] = tuple(sorted(_PAIR_LOSSES | _CLASS_LOSSES))
MEMORY_LOSSES: tuple[str, ...] = (
    "contrastive", "eer", "fmr_band", "multisimilarity", "supcon", "triplet", "triplet_all")


class WeightedSum(nn.Module):
    """``Σ wᵢ · lossᵢ(embeddings, labels)``; its statistics are its terms' (the first term that
    names a statistic wins), so a run trained with a sum logs what its EERLoss term reports.
    It takes a memory when every term does: a comparison gives every term the same memory."""

    def __init__(self, terms: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = {name: float(weights.get(name, 1.0)) for name in terms}
        self.takes_memory = all(term.takes_memory for term in terms.values())

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, return_stats: bool = False,
        shard: PairShard | None = None, memory: Memory | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Stats]:
        total, stats = torch.zeros((), device=embeddings.device), dict[str, Any]()
        for name, term in self.terms.items():
            if return_stats:
                value, term_stats = term(embeddings, labels, return_stats=True, shard=shard, memory=memory)
            else:
                value, term_stats = term(embeddings, labels, shard=shard, memory=memory), {}
            stats = {**term_stats, **stats}
            total = total + self.weights[name] * value
        return (total, stats) if return_stats else total


def build_loss(name: str, embedding_size: int, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """``build_loss("eer", 256, variant="area")``; ``kwargs`` go to the loss itself (for a sum
    ``a+b``: ``a={...}, b={...}, weights={...}``)."""
    if "+" in name:
        return _build_sum(name.split("+"), embedding_size, num_classes, kwargs)
    if name in _PAIR_LOSSES:
        return _PAIR_LOSSES[name](**kwargs)
    if name in _CLASS_LOSSES:
        return _CLASS_LOSSES[name](embedding_size, num_classes, **kwargs)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")


def _build_sum(names: list[str], embedding_size: int, num_classes: int | None, options: dict[str, Any]) -> nn.Module:
    if len(set(names)) != len(names) or "" in names:
        raise ValueError(f"a loss sum joins distinct loss names with '+', got {'+'.join(names)!r}")
    weights = options.pop("weights", None) or {}
    malformed = [f"{n}: {v!r}" for n, v in options.items() if not isinstance(v, dict)]
    if not (isinstance(weights, dict) and all(type(w) in (int, float) for w in weights.values())):
        malformed.append(f"weights: {weights!r}")
    if malformed:
        raise ValueError(
            f"loss {'+'.join(names)!r}: each term's options must be a mapping and weights a mapping "
            f"of term to number; got {', '.join(malformed)}"
        )
    strays = sorted((set(options) | set(weights)) - set(names))
    if strays:
        raise ValueError(
            f"loss {'+'.join(names)!r}: {', '.join(map(repr, strays))} is not one of its terms; give each "
            f"term's options under its name ({', '.join(f'{n}: {{...}}' for n in names)}) and weights as "
            "weights: {name: w}"
        )
    terms = {name: build_loss(name, embedding_size, num_classes, **(options.get(name) or {})) for name in names}
    return WeightedSum(terms, weights)
