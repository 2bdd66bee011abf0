"""Straight-line fits with bootstrap intervals: every rate in the suite is the slope of one log against another."""
from __future__ import annotations

import numpy as np

from robustmargin.stats import bootstrap_interval


def _slope(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.polyfit(u, v, 1)[0]) if np.ptp(u) > 0 else float("nan")


def slope(u, v, *, n_boot: int = 400, seed: int = 0) -> tuple[float, float, float]:
    """(slope, low, high) of the least-squares line v ≈ a + b u, with a 95 % bootstrap interval over the points."""
    u, v = np.asarray(u, float), np.asarray(v, float)
    keep = np.isfinite(u) & np.isfinite(v)
    if keep.sum() < 3:
        return float("nan"), float("nan"), float("nan")
    return bootstrap_interval(_slope, u[keep], v[keep], n_boot=n_boot, seed=seed)


def within(estimate: float, target: float, rel: float) -> bool:
    return bool(abs(estimate - target) <= rel * abs(target))
