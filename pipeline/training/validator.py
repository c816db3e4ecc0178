"""Validation: embed the val split on every rank, score it on rank 0, keep the best export."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.config import TrainConfig
from pipeline.distributed import use_rank0_buffers
from pipeline.exports import export_path, save_model
from pipeline.losses.fmr_band import FMRBandLoss, band_rates
from pipeline.metrics.report import fnmr_key
from pipeline.metrics.verification import Roc
from pipeline.training.state import RunState


@dataclass(frozen=True)
class Selection:
    """The validation metric (lower is better) that picks a run's best export: the operating
    point its EERLoss trains for. A model trained for FMR 0.1 % is kept for its FNMR there, not
    for its EER — the EER-best checkpoint of such a run is the wrong model to ship; a model
    trained for an FMR band is kept for the band's average FNMR. At such points the value rests
    on a thousandth of the impostor comparisons: ``eval.impostors_per_session: all`` makes it a
    reading of the model rather than of the draw (docs/results.md, "Where the results disagree")."""

    key: str  # the metric's name in the validation report, without ``val/``
    measure: Callable[[Roc], float]


def selection_of(config: TrainConfig) -> Selection:
    """EER, the FNMR at the target FMR (the FMR at the target FNMR) of the run's EERLoss term, or
    the mean FNMR over the FMRs of its ``fmr_band`` term."""
    band = config.loss.term_options("fmr_band")
    if band:
        return _band_selection(band[1])
    kind, rate = _trained_target(config)
    if kind == "fmr":
        return Selection(fnmr_key(rate), lambda roc: roc.fnmr_at(rate))
    if kind == "fnmr":
        return Selection(f"fmr_at_fnmr_{100 * rate:g}%", lambda roc: roc.fmr_at(rate))
    return Selection("eer", lambda roc: roc.eer()[0])


SELECTION_IMPOSTORS = 100  # fewer impostor comparisons past the target threshold: the draw picks the model


def sparse_selection(config: TrainConfig, val_sessions: int) -> str | None:
    """Why checkpoint selection at the run's target FMR would rest on too few impostor comparisons
    to tell checkpoints apart, or ``None``. ``eval.impostors_per_session: all`` is the remedy."""
    band = config.loss.term_options("fmr_band")
    kind, rate = ("fmr", float(band[1].get("low", FMRBandLoss.DEFAULT_LOW))) if band else _trained_target(config)
    drawn = config.eval.impostors_per_session
    if kind != "fmr" or drawn == "all" or val_sessions * drawn * rate >= SELECTION_IMPOSTORS:
        return None
    return (
        f"checkpoints are selected at FMR {100 * rate:g} %, where the val split's {val_sessions} sessions × "
        f"eval.impostors_per_session={drawn} leave ~{val_sessions * drawn * rate:.0f} impostor comparisons past "
        "the threshold: the choice is mostly noise; set eval.impostors_per_session=all"
    )


def _band_selection(options: Mapping[str, Any]) -> Selection:
    """The mean FNMR at the band's FMRs, e.g. ``fnmr_at_fmr_0.1-0.4%``."""
    low = float(options.get("low", FMRBandLoss.DEFAULT_LOW))
    high = float(options.get("high", FMRBandLoss.DEFAULT_HIGH))
    rates = band_rates(low, high, int(options.get("points", FMRBandLoss.DEFAULT_POINTS)))
    key = f"fnmr_at_fmr_{100 * low:g}-{100 * high:g}%"
    return Selection(key, lambda roc: float(np.mean([roc.fnmr_at(rate) for rate in rates])))


def _trained_target(config: TrainConfig) -> tuple[str, float]:
    """``(kind, rate)`` of the ``target`` of the loss's ``eer`` term (itself or in a sum);
    ``("eer", 0.0)`` for losses without one. The driver has built the loss, so its options are
    valid."""
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
        from pipeline.training.engine import pins_memory

        self.config, self.rank, self.selection = config, rank, selection_of(config)
        self.loader = SessionLoader(
            config.data.shards, "val", batch_size=config.data.eval_batch_size, max_len=config.data.max_len,
            features=tuple(config.data.features), rank=rank, world_size=world, pin_memory=pins_memory(config),
        )
        self.det: Roc | None = None  # rank 0: the last validation's ROC, for a DET plot

    def __call__(self, model: Any, state: RunState) -> dict[str, float]:
        """``val/…`` metrics on rank 0 (``{}`` elsewhere); every rank must call it (a collective)."""
        from pipeline.evaluation.embedding import embed
        from pipeline.evaluation.protocol import protocol_from, verify

        use_rank0_buffers(model)
        embeddings, labels, _ = embed(model, self.loader, gather=True, precision=self.config.train.precision)
        if self.rank != 0:
            return {}
        settings = self.config.eval
        verified = verify(embeddings, labels, protocol_from(asdict(settings)), settings.distance)
        self.det = verified.curve
        results = {f"val/{k}": v for k, v in verified.report["global"].items() if isinstance(v, float)}
        per_subject = verified.report.get("mean_per_subject", {})
        results.update({f"val/per_subject_{k}": v for k, v in per_subject.items() if isinstance(v, float)})
        value = self.selection.measure(verified.curve)
        results[f"val/{self.selection.key}"] = value
        if value < state.best_val:
            state.best_val = value
            save_model(export_path(self.config.run_dir, "best"), model, self.config.to_dict())
        return results
