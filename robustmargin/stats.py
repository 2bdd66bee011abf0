"""Statistics behind every verdict: bootstrap intervals (percentile), seeded so a table repeats; exact
tests (binomial, McNemar, permutation) and Holm's step-down correction for several tests at once."""
from __future__ import annotations

import itertools
import math
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


def joint_verdict(signs: list[int]) -> str:
    """One verdict from several statistics, each +1 (clear of its null in the claim's direction), -1 (clear
    the other way) or 0 (not clear): `held` only when every one is +1, `did not hold` when any is -1."""
    if any(s < 0 for s in signs):
        return NOT_HELD
    if signs and all(s > 0 for s in signs):
        return HELD
    return INCONCLUSIVE


def holm(p_values: list[float], alpha: float = 0.05) -> tuple[list[float], list[float]]:
    """Holm's step-down correction: (adjusted p-values, per-test significance levels), in input order.

    The test of k-th smallest p (k = 0, 1, …) is judged at alpha / (m − k); its adjusted p is the running
    maximum of (m − j) p_(j) over j ≤ k, capped at 1, so `adjusted < alpha` is Holm's rejection. A NaN p
    (no test possible) counts as 1.
    """
    p = np.array([1.0 if not np.isfinite(v) else float(v) for v in p_values])
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted, levels = np.empty(m), np.empty(m)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        adjusted[i], levels[i] = running, alpha / (m - k)
    return adjusted.tolist(), levels.tolist()


def binomial_p(successes: int, trials: int, p0: float = 0.5) -> float:
    """Two-sided exact binomial p-value that the success probability is p0 (1 when there are no trials)."""
    from scipy.stats import binomtest

    return float(binomtest(int(successes), int(trials), p0).pvalue) if trials else 1.0


def binomial_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact) interval of a proportion; NaN when there are no trials."""
    from scipy.stats import binomtest

    if not trials:
        return math.nan, math.nan
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def mcnemar_p(before: np.ndarray, after: np.ndarray) -> float:
    """Exact McNemar p-value that a paired yes/no outcome is as likely to turn on as off: under that null the
    items that changed split Binomial(changed, 1/2); items that did not change carry no information."""
    before, after = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    gained, lost = int((~before & after).sum()), int((before & ~after).sum())
    return binomial_p(gained, gained + lost)


EXACT_PERMUTATIONS = 8  # up to 8! = 40320 orderings every one is enumerated, above that they are sampled


def spearman_permutation_p(x: np.ndarray, y: np.ndarray, *, n_perm: int = 20000, seed: int = 0) -> float:
    """Two-sided permutation p-value of Spearman's ρ: the share of orderings of y whose |ρ| is at least the
    observed one. Exact (every ordering) for n ≤ EXACT_PERMUTATIONS, else from n_perm seeded random orderings
    counted with the observed one, (hits + 1) / (n_perm + 1), so p is never 0. NaN when one side is constant
    or fewer than 3 pairs are given."""
    rx = _ranks(x)
    ry = _ranks(y)
    n = len(rx)
    if n != len(ry):
        raise ValueError("x and y must have the same length")
    if n < 3 or rx.std() == 0 or ry.std() == 0:
        return math.nan
    rx, ry = rx - rx.mean(), ry - ry.mean()
    scale = math.sqrt((rx @ rx) * (ry @ ry))
    observed = abs(rx @ ry) / scale
    if n <= EXACT_PERMUTATIONS:
        perms = np.array(list(itertools.permutations(range(n))))
        rhos = np.abs(ry[perms] @ rx) / scale
        return float(np.mean(rhos >= observed - 1e-12))
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_perm, n)), axis=1)
    hits = int(np.sum(np.abs(ry[perms] @ rx) / scale >= observed - 1e-12))
    return (hits + 1) / (n_perm + 1)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank."""
    from scipy.stats import rankdata

    return rankdata(np.asarray(values, dtype=float)).astype(float)


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
