"""Statistics behind the verdicts: interval coverage on a known distribution, verdicts by interval, Holm's
correction on a hand-worked case, exact tests against their formulas (binomial sums, beta quantiles, every
permutation enumerated by scipy)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from robustmargin.stats import (HELD, INCONCLUSIVE, NOT_HELD, binomial_interval, binomial_p, bootstrap_interval,
                                equivalence_verdict, holm, interval_verdict, joint_verdict, mcnemar_p,
                                paired_mean_change, signed_rank_p, spearman_permutation_p)


def test_bootstrap_interval_covers_the_mean_at_about_its_level():
    # 200 seeded samples of 60 from N(1, 1): a 90 % interval of the mean should hold 1 about 90 % of the time;
    # the binomial sd of the count is ~4, so [170, 190] fails only if the interval's level is off
    rng = np.random.default_rng(1)
    hits = 0
    for k in range(200):
        _, low, high = bootstrap_interval(np.mean, rng.normal(1.0, 1.0, 60), n_boot=400, level=0.9, seed=k)
        hits += low <= 1.0 <= high
    assert 168 <= hits <= 192


def test_bootstrap_interval_width_matches_the_normal_theory():
    x = np.random.default_rng(2).normal(0.0, 2.0, 400)
    est, low, high = bootstrap_interval(np.mean, x, n_boot=2000, seed=0)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert est == pytest.approx(x.mean())
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)


def test_verdicts_follow_the_interval():
    assert interval_verdict(0.1, 0.3) == HELD
    assert interval_verdict(-0.3, -0.1) == NOT_HELD
    assert interval_verdict(-0.1, 0.3) == INCONCLUSIVE
    assert interval_verdict(math.nan, 1.0) == INCONCLUSIVE
    assert interval_verdict(0.55, 0.7, above=0.5) == HELD
    assert equivalence_verdict(-0.01, 0.015, tolerance=0.02) == HELD
    assert equivalence_verdict(0.03, 0.05, tolerance=0.02) == NOT_HELD
    assert equivalence_verdict(-0.01, 0.03, tolerance=0.02) == INCONCLUSIVE


def test_paired_change_uses_the_pairing():
    # every item rises by exactly 1: paired, the interval is a point; unpaired it would be wide
    before = np.random.default_rng(3).normal(0, 5, 50)
    est, low, high = paired_mean_change(before, before + 1.0)
    assert est == pytest.approx(1.0) and low == pytest.approx(1.0) and high == pytest.approx(1.0)


def test_signed_rank_p_matches_scipy():
    x = np.random.default_rng(4).normal(0.2, 1.0, 80)
    assert signed_rank_p(x) == pytest.approx(scipy_stats.wilcoxon(x).pvalue)
    assert math.isnan(signed_rank_p(np.zeros(5)))


def test_joint_verdict_needs_every_statistic():
    assert joint_verdict([1, 1, 1]) == HELD
    assert joint_verdict([1, 1, 0]) == INCONCLUSIVE
    assert joint_verdict([1, 1, -1]) == NOT_HELD   # one statistic clear the other way is enough
    assert joint_verdict([0, -1]) == NOT_HELD
    assert joint_verdict([]) == INCONCLUSIVE


def test_holm_on_a_hand_worked_case():
    # sorted p 0.01, 0.02, 0.03, 0.04 of m = 4: (m - k) p = 0.04, 0.06, 0.06, 0.04; running max 0.04, 0.06, 0.06, 0.06
    adjusted, levels = holm([0.03, 0.01, 0.04, 0.02])
    assert adjusted == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert levels == pytest.approx([0.025, 0.0125, 0.05, 1 / 60])
    # NaN counts as 1, the cap is 1, one test is left alone
    adjusted, levels = holm([math.nan, 0.5, 0.001])
    assert adjusted == pytest.approx([1.0, 1.0, 0.003]) and levels == pytest.approx([0.05, 0.025, 0.05 / 3])
    assert holm([0.03]) == ([0.03], [0.05])


def test_binomial_and_mcnemar_against_the_binomial_sum():
    def two_sided(k: int, n: int) -> float:  # symmetric null: twice the smaller tail
        tail = sum(math.comb(n, j) for j in range(min(k, n - k) + 1)) / 2 ** n
        return min(1.0, 2 * tail)
    assert binomial_p(200, 450) == pytest.approx(two_sided(200, 450), rel=1e-9)
    assert binomial_p(3, 10) == pytest.approx(two_sided(3, 10))
    assert binomial_p(0, 0) == 1.0
    before = np.array([1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 1], dtype=bool)
    after = np.array([1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1], dtype=bool)  # 5 gained, 1 lost, 5 unchanged
    assert mcnemar_p(before, after) == pytest.approx(two_sided(1, 6))
    assert mcnemar_p(before, before) == 1.0  # nothing changed: no evidence either way


def test_binomial_interval_is_clopper_pearson():
    k, n, level = 200, 450, 0.99
    low, high = binomial_interval(k, n, level)
    a = (1 - level) / 2
    assert low == pytest.approx(scipy_stats.beta.ppf(a, k, n - k + 1))
    assert high == pytest.approx(scipy_stats.beta.ppf(1 - a, k + 1, n - k))
    assert binomial_interval(0, 10)[0] == 0.0 and all(math.isnan(v) for v in binomial_interval(0, 0))


def test_spearman_permutation_p_is_exact_for_few_runs():
    # four runs in perfect order: only the identity and the reversal reach |ρ| = 1, p = 2/24 whatever the values
    ordered = spearman_permutation_p(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1.0, 5.0, 7.0, 9.0]))
    assert ordered == pytest.approx(2 / 24)
    # against an independent enumeration of all 7! orderings (ties included)
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=7), rng.normal(size=7)
    y[2] = y[4]
    rho = scipy_stats.spearmanr(x, y).statistic
    count = sum(abs(scipy_stats.spearmanr(x, y[list(p)]).statistic) >= abs(rho) - 1e-12
                for p in itertools.permutations(range(7)))
    assert spearman_permutation_p(x, y) == pytest.approx(count / math.factorial(7))
    assert math.isnan(spearman_permutation_p(x, np.ones(7))) and math.isnan(spearman_permutation_p(x[:2], y[:2]))


def test_spearman_permutation_p_sampled_for_more_runs():
    # 30 runs: sampled orderings agree with scipy's t-approximation p up to sampling and approximation error
    rng = np.random.default_rng(6)
    x = rng.normal(size=30)
    y = 0.4 * x + rng.normal(size=30)
    reference = scipy_stats.spearmanr(x, y).pvalue
    got = spearman_permutation_p(x, y, n_perm=20000)
    assert 0.001 < reference < 0.2 and got == pytest.approx(reference, abs=0.015)
    assert spearman_permutation_p(x, y) == spearman_permutation_p(x, y)  # seeded
