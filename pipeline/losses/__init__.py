"""Losses for verification training; ``EERLoss`` is the product's core."""

from pipeline.losses.eer import EERLoss, EERStats, pair_distances

__all__ = ["EERLoss", "EERStats", "pair_distances"]
