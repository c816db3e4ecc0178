"""Keystroke embedding models: ``build_model(name, **cfg)``, all mask-aware."""

from pipeline.models.registry import MODELS, build_model, count_parameters

__all__ = ["MODELS", "build_model", "count_parameters"]
