"""What a run trains, built one way from its config: the model, the loss and the training loader.

Why one module: the driver builds each of them once before Ray starts, to refuse a bad name,
option or size in one line, and every worker builds them again to train. Built by two code paths,
a setting could pass the driver's check and then fail, or mean something else, on the workers.
"""

from __future__ import annotations

from torch import nn

from pipeline.config import TrainConfig
from pipeline.data import SamplerConfig, SubjectBatchLoader


def build_run_model(config: TrainConfig) -> nn.Module:
    """The model of ``config`` with fresh weights (``torch.device("meta")`` around the call builds
    it without memory, which is how the driver counts its weights)."""
    from pipeline.models import build_model

    model = config.model
    return build_model(model.name, features=tuple(config.data.features), embedding_size=model.embedding_size,
                       **model.options)


def build_criterion(config: TrainConfig, num_classes: int) -> nn.Module:
    """The loss of ``config``; ``num_classes`` (the training split's subjects) sizes class-based losses."""
    from pipeline.losses.registry import build_loss

    return build_loss(config.loss.name, config.model.embedding_size, num_classes, **config.loss.options)


def sampler_config(config: TrainConfig) -> SamplerConfig:
    """The subject-aware sampler's settings of a training config."""
    data = config.data
    return SamplerConfig(subjects_per_batch=data.subjects_per_batch, sessions_per_subject=data.sessions_per_subject,
                         max_len=data.max_len, features=tuple(data.features), short_subjects=data.short_subjects,
                         seed=config.run.seed, subjects=data.train_subjects, hard_batches=data.hard_batches)


def train_loader(config: TrainConfig, rank: int, world: int, pin_memory: bool = False) -> SubjectBatchLoader:
    """Rank ``rank`` of ``world``'s loader of the training split."""
    return SubjectBatchLoader(config.data.shards, "train", sampler_config(config), rank=rank, world_size=world,
                              num_workers=config.data.loader_workers, pin_memory=pin_memory)
