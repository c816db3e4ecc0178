"""Training's one entry point: a run, or a staged run (``train.stages``) stage by stage."""

from __future__ import annotations

from pipeline.config import TrainConfig
from pipeline.training.driver import TrainResult, train_run
from pipeline.training.stages import train_stages


def train(config: TrainConfig, resume_from: str | None = None, show_progress: bool = True) -> TrainResult:
    """Run (or resume) ``config.run.name`` to the end of its schedule (:func:`train_run`), or of
    its last stage for a staged run (:mod:`~pipeline.training.stages`); returns where things are."""
    if config.train.stages:
        return train_stages(config, resume_from, show_progress)
    return train_run(config, resume_from, show_progress)
