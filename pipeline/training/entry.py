"""Training's one entry point: a run, or a staged run (``train.stages``) stage by stage."""

from __future__ import annotations

from pipeline.config import TrainConfig
from pipeline.training.driver import (
    TrainResult,
    check_run_storage,
    launch,
    prepare,
    recorded_result,
    run_lock,
    trained_to_the_end,
)
from pipeline.training.schedule import scheduled_end
from pipeline.training.stages import train_stages


def train(config: TrainConfig, resume_from: str | None = None, show_progress: bool = True) -> TrainResult:
    """Run (or resume) ``config.run.name`` to the end of its schedule, or of its last stage for a
    staged run (:mod:`~pipeline.training.stages`); returns where things are. The run's folder is
    locked before its checks, which read it (and may repair Ray's snapshot there): a second
    launch of a running run is refused before it touches the run's files. A run that has trained
    to the end its settings give is not launched again: its result is read from its files."""
    if config.train.stages:
        return train_stages(config, resume_from, show_progress)
    config = config.with_absolute_paths()
    check_run_storage(config)
    with run_lock(config.run_dir):
        config, resume_from = prepare(config, resume_from)
        if not resume_from and trained_to_the_end(config):
            result = recorded_result(config)
            if result.metrics["step"] == scheduled_end(config):  # else settings that now end elsewhere go on
                return result
        return launch(config, resume_from, show_progress)
