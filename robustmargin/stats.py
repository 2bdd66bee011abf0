"""Statistics behind every verdict: bootstrap intervals (percentile), seeded so a table repeats."""
from __future__ import annotations

from typing import Callable

import numpy as np


def bootstrap_interval(statistic: Callable[..., float], *samples: np.ndarray, n_boot: int = 2000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, low, high): `statistic(*samples)` and its percentile bootstrap interval.

    The samples are resampled together (the same indices for each), so paired data stays paired.
    """
    arrays = [np.asarray(s) for s in samples]
    n = len(arrays[0])
    if n == 0 or any(len(a) != n for a in arrays):
        raise ValueError("bootstrap needs non-empty samples of equal length")
    rng = np.random.default_rng(seed)
    estimate = float(statistic(*arrays))
    draws = np.array([statistic(*(a[idx] for a in arrays))
                      for idx in rng.integers(0, n, size=(n_boot, n))], dtype=float)
    tail = (1 - level) / 2
    low, high = np.nanquantile(draws, [tail, 1 - tail])
    return estimate, float(low), float(high)
