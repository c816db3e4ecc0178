"""Streaming, models, losses, metrics and distributed training for EERLoss."""
