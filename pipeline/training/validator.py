"""Validation: embed the val split on every rank, score it on rank 0, keep the best export."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.config import TrainConfig
from pipeline.distributed import use_rank0_buffers
from pipeline.exports import export_path, save_model
from pipeline.losses.fmr_band import FMRBandLoss
from pipeline.metrics.report import fnmr_key
from pipeline.metrics.verification import Roc, validate
from pipeline.training.state import RunState


@dataclass(frozen=True)
class Selection:
    """The validation metric (lower is better) that picks a run's best export: the operating
    point its EERLoss trains for. A model trained for FMR 0.1 % is kept for its FNMR there, not
    for its EER — the EER-best checkpoint of such a run is the wrong model to ship."""

    key: str  # the metric's name in the validation report, without ``val/``
    measure: Callable[[Roc], float]


def selection_of(config: TrainConfig) -> Selection:
    """EER, or the FNMR at the target FMR (the FMR at the target FNMR) of the run's EERLoss term."""
    kind, rate = _trained_target(config)
    if kind == "fmr":
        return Selection(fnmr_key(rate), lambda roc: roc.fnmr_at(rate))
    if kind == "fnmr":
        return Selection(f"fmr_at_fnmr_{100 * rate:g}%", lambda roc: roc.fmr_at(rate))
    return Selection("eer", lambda roc: roc.eer()[0])


def _trained_target(config: TrainConfig) -> tuple[str, float]:
    """``(kind, rate)`` of the ``target`` of the loss's ``eer`` term (itself or in a sum), or the
    low end of its ``fmr_band`` term; ``("eer", 0.0)`` for losses without either. The driver has
    built the loss, so its options are valid."""
    band = config.loss.term_options("fmr_band")
    if band:
        return "fmr", float(band[1].get("low", FMRBandLoss.DEFAULT_LOW))
    eer = config.loss.term_options("eer")
    target = eer[1].get("target", "eer") if eer else "eer"
    if not isinstance(target, Mapping):
        return "eer", 0.0
    ((kind, rate),) = target.items()
    return str(kind), float(rate)


class Validator:
    """The full KVC report of the val split, by the evaluation protocol; the model with the
    best validation value of the run's :class:`Selection` so far is exported as the run's best."""

    def __init__(self, config: TrainConfig, rank: int, world: int) -> None:
        from pipeline.data import SessionLoader

        self.config, self.rank, self.selection = config, rank, selection_of(config)
        self.loader = SessionLoader(
            config.data.shards, "val", batch_size=config.data.eval_batch_size, max_len=config.data.max_len,
            features=tuple(config.data.features), rank=rank, world_size=world,
        )
        self.det: tuple[np.ndarray, np.ndarray] | None = None  # rank 0: last (truth, scores), for a DET

    def __call__(self, model: Any, state: RunState) -> dict[str, float]:
        """``val/…`` metrics on rank 0 (``{}`` elsewhere); every rank must call it (a collective)."""
        from pipeline.evaluation.embedding import embed
        from pipeline.evaluation.protocol import protocol_from, verify

        use_rank0_buffers(model)
        embeddings, labels, _ = embed(model, self.loader, gather=True)
        if self.rank != 0:
            return {}
        settings = self.config.eval
        report, truth, scores = verify(embeddings, labels, protocol_from(asdict(settings)), settings.distance)
        self.det = (truth, scores)
        results = {f"val/{k}": v for k, v in report["global"].items() if isinstance(v, float)}
        per_subject = report.get("mean_per_subject", {})
        results.update({f"val/per_subject_{k}": v for k, v in per_subject.items() if isinstance(v, float)})
        value = self.selection.measure(Roc.of(*validate(truth, scores)))
        results[f"val/{self.selection.key}"] = value
        if value < state.best_val:
            state.best_val = value
            save_model(export_path(self.config.run_dir, "best"), model, self.config.to_dict())
        return results
