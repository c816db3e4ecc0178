"""Where a step's numbers go: W&B (rank 0), Ray reports (every rank), DET plots."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipeline.config import TrainConfig
from pipeline.metrics.verification import Roc
from pipeline.training.clock import STEP_PHASES, StepTimer
from pipeline.training.state import StageContext
from pipeline.training.wandb_run import WandbRun


def step_metrics(engine: Any, loss: torch.Tensor, stats: dict[str, float], parameter_norm: float | None,
                 timer: StepTimer, sessions_per_step: int) -> dict[str, float]:
    """``train/…`` and ``time/…`` of a logged step (loss statistics as ``train/<name>``)."""
    phases, model_times = timer.phases, engine.module.timings
    norm = engine.get_global_grad_norm()
    norm = parameter_norm if norm is None else norm
    step_time = sum(phases[phase] for phase in STEP_PHASES)
    metrics = {
        "train/loss": float(loss.detach()),
        "train/lr": float(engine.get_lr()[0]),
        "train/step_time": step_time,
        "train/sessions_per_s": sessions_per_step / max(1e-9, step_time),
        "time/data": phases["data"],
        "time/forward": model_times.get("forward", 0.0),
        "time/gather_loss": model_times.get("gather_loss", 0.0),
        "time/enqueue": model_times.get("enqueue", 0.0),
        "time/backward": phases["backward"],
        "time/optimizer": phases["optimizer"],
    }
    if norm is not None:
        metrics["train/grad_norm"] = float(norm)
    metrics.update(engine.module.memory_metrics())
    metrics.update({f"train/{name}": value for name, value in stats.items()})
    return metrics


def parameter_grad_norm(engine: Any) -> float | None:
    """The norm of the averaged gradients, for when DeepSpeed keeps none (ZeRO-0); call it
    between ``backward`` and ``step``, which clears them."""
    grads = [p.grad.norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else None


class MetricsSink:
    """Publishes metrics: to W&B on rank 0 (:mod:`pipeline.training.wandb_run`: a relaunch
    continues the same W&B run, and a W&B failure never stops training) and to Ray Train on every
    rank (a report is a barrier). A stage of a staged run logs into the staged run's W&B run, at
    the staged run's steps, so that the stages read as one run's curves; Ray hears its own steps."""

    def __init__(self, config: TrainConfig, rank: int, stage: StageContext | None = None) -> None:
        self.wandb = WandbRun(config, stage) if rank == 0 and config.wandb.enabled else None
        self.stage = stage

    def publish(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        """A report to Ray; with a checkpoint, W&B's files written so far also reach the run's
        storage, so a pod's death loses little more of them than of the training."""
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None and self.wandb is not None:
            self.wandb.copy_to_storage()

    def log(self, metrics: dict[str, Any], step: int, det: Roc | None = None) -> None:
        """W&B, rank 0 only: one row, its ``step`` the training step (of the staged run, beside its
        ``stage``, for a stage); ``det``: a validation's ROC, plotted as ``val/det``."""
        if self.wandb is None:
            return
        position = {"step": step} if self.stage is None else {"step": self.stage.step_offset + step,
                                                              "stage": self.stage.index}
        row = {key: value for key, value in metrics.items() if key != "total_steps"} | position
        with _det_image(det) as image:
            self.wandb.log(row | image)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


@contextmanager
def _det_image(det: Roc | None) -> Iterator[dict[str, Any]]:
    """``{"val/det": image}`` of a validation's ROC, or nothing; the plot's file
    lives until W&B has read it (in ``log``)."""
    if det is None:
        yield {}
        return
    import wandb

    from pipeline.metrics import plot_det

    with tempfile.TemporaryDirectory() as directory:
        yield {"val/det": wandb.Image(str(plot_det({"val": det}, Path(directory, "det.png"))))}
