"""Where a step's numbers go: step timings, W&B (rank 0), Ray reports (every rank), DET plots."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.training.clock import clock

STEP_PHASES = ("data", "model", "backward", "optimizer")  # a step's time; validation etc. excluded


class StepTimer:
    """Wall time of a step's phases on this rank's clock; ``lap(phase)`` ends ``phase``.

    While ``measuring`` (set for the steps that are logged, from the lap that starts them), every
    lap first waits for ``device`` (``pipeline/training/clock.py``), so a GPU phase's time is its own.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device, self.measuring = device, False
        self.last = clock()
        self.phases: dict[str, float] = {}

    @property
    def wait_for(self) -> torch.device | None:
        """The device the phases of this step wait for, if it is measured."""
        return self.device if self.measuring else None

    def lap(self, phase: str) -> None:
        now = clock(self.wait_for)
        self.phases[phase], self.last = now - self.last, now


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
    """Publishes metrics: to W&B on rank 0 (the run id follows the run name, so a relaunch
    continues the same W&B run) and to Ray Train on every rank (a report is a barrier)."""

    def __init__(self, config: TrainConfig, rank: int) -> None:
        self.wandb = _start_wandb(config) if rank == 0 and config.wandb.enabled else None

    def publish(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint)

    def log(self, metrics: dict[str, Any], step: int, det: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """W&B, rank 0 only; ``det``: a validation's (truth, scores), plotted as ``val/det``."""
        if self.wandb is None:
            return
        self.wandb.log({k: v for k, v in metrics.items() if k not in ("step", "total_steps")}, step=step)
        if det is not None:
            self._log_det(*det, step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()

    def _log_det(self, truth: np.ndarray, scores: np.ndarray, step: int) -> None:
        import wandb

        from pipeline.metrics import plot_det

        with tempfile.TemporaryDirectory() as directory:
            path = plot_det({"val": (truth, scores)}, Path(directory, "det.png"))
            self.wandb.log({"val/det": wandb.Image(str(path))}, step=step)


def _start_wandb(config: TrainConfig) -> Any:
    import wandb

    from pipeline.cluster import wandb_run_id

    mode = config.wandb.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run_dir = config.run_dir
    directory = config.wandb.dir or (run_dir if "://" not in run_dir else str(Path("wandb-runs").resolve()))
    Path(directory).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=config.wandb.project, name=config.run.name, id=wandb_run_id(config.run.storage, config.run.name),
        resume="allow", mode=mode, dir=directory, config=config.to_dict(),
    )
