"""The DeepSpeed engine of a run: its settings, its learning-rate schedule, its safe loading."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.training.checkpointer import install_safe_loading
from pipeline.training.memory import CrossBatchMemory
from pipeline.training.model_with_loss import ModelWithLoss
from pipeline.training.schedule import Schedule, lr_factor


def deepspeed_config(config: TrainConfig, world: int) -> dict[str, Any]:
    """DeepSpeed settings from the training config; the config's own checks (``pipeline.config``)
    keep these within what DeepSpeed honours. DeepSpeed always holds fp32 weights and reduces
    fp32 gradients: ``train.precision: bf16`` is autocast inside :class:`ModelWithLoss`
    (``pipeline/models/precision.py`` says why not DeepSpeed's ``bf16`` block)."""
    train = config.train
    micro_batch = config.data.subjects_per_batch * config.data.sessions_per_subject
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW" if train.weight_decay else "Adam",
            "params": {"lr": train.lr, "weight_decay": train.weight_decay, "torch_adam": True},
        },
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 10**9,
    }


def pins_memory(config: TrainConfig) -> bool:
    """Whether the loaders pin their batches: only copies to a CUDA device gain (they become
    asynchronous, ``Batch.to(device, non_blocking=True)``); pinning costs host memory elsewhere."""
    return config.train.use_gpu and torch.cuda.is_available()


def build_engine(
    config: TrainConfig, world: int, schedule: Schedule, model: nn.Module, criterion: nn.Module,
    memory: CrossBatchMemory | None = None,
) -> Any:
    """``deepspeed.initialize`` over :class:`ModelWithLoss`, with warm-up + decay over the whole
    schedule and checkpoints loaded without running code."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op: skip its JIT build
    warmup, kind = config.train.warmup_steps, config.train.schedule
    engine, *_ = deepspeed.initialize(
        model=ModelWithLoss(model, criterion, shard_pairs=config.loss.pairs == "sharded", memory=memory,
                       precision=config.train.precision),
        config=deepspeed_config(config, world),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, warmup, schedule.total_steps, kind)
        ),
    )
    install_safe_loading(engine)
    return engine
