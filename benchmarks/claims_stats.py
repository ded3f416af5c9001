"""The claims report's intervals: a percentile bootstrap and its one-line format."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], groups: Sequence[str] | None = None, resamples: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(statistic, lo, hi): percentile bootstrap over the items. The statistic is the mean, or with
    `groups` the mean over groups of each group's mean (GenEval's overall over tags)."""
    v = np.asarray(values, dtype=np.float64)
    codes = np.unique(np.asarray(groups), return_inverse=True)[1] if groups is not None else np.zeros(len(v), int)
    onehot = np.eye(codes.max() + 1)[codes]  # (n, G)

    def stat(idx: np.ndarray) -> np.ndarray:  # (R, n) resampled item indices -> (R,)
        counts = onehot[idx].sum(1)  # (R, G)
        with np.errstate(invalid="ignore"):
            return np.nanmean((v[idx][..., None] * onehot[idx]).sum(1) / counts, axis=1)

    point = float(stat(np.arange(len(v))[None])[0])
    rng = np.random.default_rng(seed)
    lo, hi = np.quantile(stat(rng.integers(0, len(v), (resamples, len(v)))), [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)


def format_ci(ci: tuple[float, float, float], scale: float = 100.0) -> str:
    point, lo, hi = (scale * x for x in ci)
    return f"{point:.1f} [{lo:.1f}, {hi:.1f}]"
