"""Validation: embed the val split on every rank, score it on rank 0, keep the best export."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from pipeline.config import TrainConfig
from pipeline.exports import export_path, save_model
from pipeline.training.state import RunState


class Validator:
    """The full KVC report of the val split, by the evaluation protocol; the model with the
    lowest validation EER so far is exported as the run's best."""

    def __init__(self, config: TrainConfig, rank: int, world: int) -> None:
        from pipeline.data import SessionLoader

        self.config, self.rank = config, rank
        self.loader = SessionLoader(
            config.data.shards, "val", batch_size=config.data.eval_batch_size, max_len=config.data.max_len,
            features=tuple(config.data.features), rank=rank, world_size=world,
        )
        self.det: tuple[np.ndarray, np.ndarray] | None = None  # rank 0: last (truth, scores), for a DET

    def __call__(self, model: Any, state: RunState) -> dict[str, float]:
        """``val/…`` metrics on rank 0 (``{}`` elsewhere); every rank must call it (a collective)."""
        from pipeline.evaluation.embedding import embed
        from pipeline.evaluation.protocol import protocol_from, verify

        embeddings, labels, _ = embed(model, self.loader, gather=True)
        if self.rank != 0:
            return {}
        settings = self.config.eval
        report, truth, scores = verify(embeddings, labels, protocol_from(asdict(settings)), settings.distance)
        self.det = (truth, scores)
        results = {f"val/{k}": v for k, v in report["global"].items() if isinstance(v, float)}
        per_subject = report.get("mean_per_subject", {})
        results.update({f"val/per_subject_{k}": v for k, v in per_subject.items() if isinstance(v, float)})
        if results["val/eer"] < state.best_val_eer:
            state.best_val_eer = results["val/eer"]
            save_model(export_path(self.config.run_dir, "best"), model, self.config.to_dict())
        return results
