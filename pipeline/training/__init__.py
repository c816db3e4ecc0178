"""Distributed training: Ray Train (V2) launches DeepSpeed workers; the loss sees the global batch.

``entry`` (``train``: a run or a staged run) · ``driver`` (checks, lock, launch, result) ·
``stages`` (staged training) · ``worker`` (the loop each
rank runs) · ``model_with_loss`` (model, gather, loss) · ``memory`` (the cross-batch queue and its
momentum encoder) · ``engine`` (DeepSpeed settings) · ``schedule`` (step counts, learning rate) ·
``state`` (the run's progress) · ``checkpointer`` (save, restore, safe loading) ·
``ray_snapshot`` (which checkpoint Ray resumes) · ``validator`` (val metrics, best export) ·
``metrics_sink`` (Ray reports, timings) · ``wandb_run`` (rank 0's W&B run) · ``progress``
(driver display) · ``warm_start`` (fine-tuning from an export).
"""

from pipeline.training.driver import TrainResult, prepare
from pipeline.training.entry import train

__all__ = ["TrainResult", "prepare", "train"]
