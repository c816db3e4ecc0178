"""Models by name, so a training config picks ``model.name`` and passes the rest as keywords."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from pipeline.models.bigru import BiGRU
from pipeline.models.transformer import KeystrokeTransformer
from pipeline.models.type2branch import SIZES, Type2Branch
from pipeline.models.typenet import TypeNet


def _type2branch(size: str = "small", **cfg: Any) -> Type2Branch:
    if size not in SIZES:
        raise ValueError(f"type2branch size must be one of {sorted(SIZES)}, got {size!r}")
    return Type2Branch(**{**SIZES[size], **cfg})


MODELS: dict[str, Callable[..., nn.Module]] = {
    "bigru": BiGRU,
    "type2branch": _type2branch,
    "typenet": TypeNet,
    "transformer": KeystrokeTransformer,
}


def build_model(name: str, **cfg: Any) -> nn.Module:
    """``build_model("type2branch", size="large", features=..., embedding_size=256)``.

    Every model is called as ``model(features [B, L, F], mask [B, L]) → [B, embedding_size]``;
    ``features`` (the loader's feature names) fixes F and where the keycode column is.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**cfg)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
