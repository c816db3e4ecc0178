"""Fine-tuning: a fresh run that starts from another run's exported weights."""

from __future__ import annotations

import torch

from pipeline.config import TrainConfig
from pipeline.exports import load_model


def warm_start_weights(config: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights of ``config.train.init_from``, refused unless they were trained for the same
    model and features: fine-tuning changes the loss or the data, never the architecture."""
    model, export = load_model(config.train.init_from)
    wanted = {
        "model": {"name": config.model.name, "embedding_size": config.model.embedding_size,
                  "options": config.model.options},
        "features": list(config.data.features),
    }
    found = {"model": {"options": {}, **export["model"]}, "features": export["data"]["features"]}
    if found != wanted:
        raise ValueError(f"train.init_from={config.train.init_from}: exported for {found}, this run trains {wanted}")
    return model.state_dict()
