"""Training's one entry point: a run, or a staged run (``train.stages``) stage by stage."""

from __future__ import annotations

from pipeline.config import TrainConfig
from pipeline.training.driver import TrainResult, check_run_storage, launch, prepare, run_lock
from pipeline.training.stages import train_stages


def train(config: TrainConfig, resume_from: str | None = None, show_progress: bool = True) -> TrainResult:
    """Run (or resume) ``config.run.name`` to the end of its schedule, or of its last stage for a
    staged run (:mod:`~pipeline.training.stages`); returns where things are. The run's folder is
    locked before its checks, which read it (and may repair Ray's snapshot there): a second
    launch of a running run is refused before it touches the run's files."""
    if config.train.stages:
        return train_stages(config, resume_from, show_progress)
    config = config.with_absolute_paths()
    check_run_storage(config)
    with run_lock(config.run_dir):
        config, resume_from = prepare(config, resume_from)
        return launch(config, resume_from, show_progress)
