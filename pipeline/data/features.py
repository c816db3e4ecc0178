"""Per-keystroke model inputs, computed in the loader from the raw ``[press_ms, release_ms, keycode]``.

Normalisation (Type2Branch's, docs/design.md §3), one column per feature in the order requested:

=================  ====================================================  ===============
``keycode``        ``keycode / 255``; keycodes outside 0–255 (or not      [0, 1]
                   finite) → 0
``hold``           ``(release_i − press_i) / 1000`` s                     clipped [0, 30]
``flight``         ``(press_i − press_{i−1}) / 1000`` s, 0 for key 0      clipped [0, 30]
``inter_release``  ``(release_i − release_{i−1}) / 1000`` s, 0 for key 0  clipped [0, 30]
``release_press``  ``(press_i − release_{i−1}) / 1000`` s, 0 for key 0    clipped [−30, 30]
=================  ====================================================  ===============

Negative hold, flight and inter-release times only come from corrupt or reordered rows, so they
become 0 like Type2Branch's flight; release-to-press is legitimately negative when keys overlap
(rollover typing), so it keeps its sign. Every timing is capped at 30 s so that one long pause
cannot dominate a batch, and a non-finite time yields 0. Sessions are truncated to their first
``max_len`` keys or zero-padded, and ``mask`` marks the real keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.config import DEFAULT_FEATURES, FEATURES

__all__ = ["DEFAULT_FEATURES", "FEATURES", "check_features", "featurize"]

MAX_SECONDS = 30.0


def check_features(features: Sequence[str]) -> tuple[str, ...]:
    """Validate a feature list early, so a config typo fails before any shard is read."""
    features = tuple(features)
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features or len(set(features)) != len(features):
        raise ValueError(
            f"features must be distinct names from {FEATURES}; got {list(features)}"
        )
    return features


def _since_previous(current: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """``current_i − previous_{i−1}`` along the keys, 0 for the first key."""
    delta = np.zeros_like(current)
    delta[:, 1:] = current[:, 1:] - previous[:, :-1]
    return delta


def featurize(
    sessions: Sequence[np.ndarray],
    features: Sequence[str] = DEFAULT_FEATURES,
    max_len: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Features ``float32 [B, max_len, F]`` and mask ``bool [B, max_len]`` for raw sessions.

    Each session is ``[n_keys, 3]`` (press ms, release ms, keycode). Vectorised over the batch:
    the loader featurises a whole P×K batch in one call.
    """
    features = check_features(features)
    if max_len < 1:
        raise ValueError(f"max_len must be ≥ 1, got {max_len}")
    raw = np.zeros((len(sessions), max_len, 3), dtype=np.float64)
    mask = np.zeros((len(sessions), max_len), dtype=bool)
    for row, session in enumerate(sessions):
        keys = np.asarray(session, dtype=np.float64).reshape(-1, 3)[:max_len]
        raw[row, : len(keys)] = keys
        mask[row, : len(keys)] = True
    raw[~np.isfinite(raw)] = np.nan  # propagates into the features it touches, which become 0
    press, release, keycode = raw[..., 0], raw[..., 1], raw[..., 2]
    columns = {
        "keycode": np.where((keycode >= 0) & (keycode <= 255), keycode / 255.0, 0.0),
        "hold": _seconds(release - press, 0.0),
        "flight": _seconds(_since_previous(press, press), 0.0),
        "inter_release": _seconds(_since_previous(release, release), 0.0),
        "release_press": _seconds(_since_previous(press, release), -MAX_SECONDS),
    }
    out = np.stack([columns[name] for name in features], axis=-1)
    out[~mask] = 0.0
    return out.astype(np.float32), mask


def _seconds(milliseconds: np.ndarray, low: float) -> np.ndarray:
    seconds = np.clip(milliseconds / 1000.0, low, MAX_SECONDS)
    return np.where(np.isnan(seconds), 0.0, seconds)
