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


HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"


def interval_verdict(low: float, high: float, *, above: float = 0.0) -> str:
    """A one-sided question answered by an interval: `held` when it lies wholly above `above`,
    `did not hold` when wholly below, `inconclusive` when it straddles it (or is undefined)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    if low > above:
        return HELD
    if high < above:
        return NOT_HELD
    return INCONCLUSIVE


def equivalence_verdict(low: float, high: float, *, tolerance: float) -> str:
    """`held` when the interval lies within ±tolerance, `did not hold` when it lies wholly outside,
    `inconclusive` otherwise: "barely changes" needs the interval, not the estimate, to be small."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    if -tolerance <= low and high <= tolerance:
        return HELD
    if low > tolerance or high < -tolerance:
        return NOT_HELD
    return INCONCLUSIVE


def paired_mean_change(before: np.ndarray, after: np.ndarray, *, n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """mean(after) − mean(before) over the same items, with a paired bootstrap interval."""
    diff = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    return bootstrap_interval(np.mean, diff, n_boot=n_boot, level=level, seed=seed)


def signed_rank_p(values: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value that `values` are centred on 0 (NaN when all are 0 or
    fewer than two are given)."""
    from scipy.stats import wilcoxon

    values = np.asarray(values, dtype=float)
    if len(values) < 2 or not np.any(values != 0):
        return float("nan")
    return float(wilcoxon(values).pvalue)
