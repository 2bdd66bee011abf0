"""Attacks against the exact minimal distances of small random ReLU networks (tests/relu_exact.py).

Five networks (4-6 inputs, 6-8 hidden units, 3 classes), ten points each. An attack returns a
verified adversarial, so its distance can never be below the exact one; how close it gets is the
attack's quality. Run with `-m slow -s` to print the table per attack and budget (median and worst
ratio to the exact distance, share within 1 %, seconds).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from relu_exact import random_problem
from robustmargin.attacks import ENSEMBLES, budget_options, ddn, fmn, per_sample_minimum, run_attack

NETS = [(3, 4, (6,)), (6, 5, (7,)), (6, 6, (8,)), (3, 4, (8,)), (4, 5, (8,))]
# float32 points: a distance may fall below the float64 exact one by rounding only
REL, ABS = 1e-5, 1e-6


@pytest.fixture(scope="module")
def problems():
    return [random_problem(seed, inputs=d, hidden=h, points=10) for seed, d, h in NETS]


_cache: dict[str, tuple[np.ndarray, float]] = {}


def ratios(problems, name: str, budget: str) -> tuple[np.ndarray, float]:
    """(distance / exact for all 50 points, seconds) of one attack under one budget; cached by
    settings (CW's reference and strong settings are the same run)."""
    options = budget_options(name, budget)
    key = f"{name} {sorted(options.items())}"
    if key not in _cache:
        parts, seconds = [], 0.0
        for net, x, y, exact in problems:
            result = run_attack(net, x, y, name, batch_size=len(x), **options)
            assert bool(result.correct.all())
            parts.append(result.distances.numpy() / exact)
            seconds += result.seconds
        _cache[key] = (np.concatenate(parts), seconds)
    return _cache[key]


def summary(name: str, budget: str, r: np.ndarray, seconds: float) -> str:
    return (f"{name:>6} {budget:>9}: median {np.median(r):.4f}  worst {r.max():.4f}  "
            f"within 1 % {np.mean(r <= 1.01):.2f}  {seconds:.1f} s")


def never_below_exact(r: np.ndarray, problems) -> bool:
    exact = np.concatenate([p[3] for p in problems])
    return bool(np.all(r * exact >= exact * (1 - REL) - ABS))


def test_problems_are_nondegenerate(problems):
    for net, x, y, exact in problems:
        assert len(x) == 10 and np.all(exact > 0) and np.all(np.isfinite(exact))
        assert len(torch.unique(y)) >= 2


@pytest.mark.parametrize("name,median", [("ddn", 1.05), ("fmn", 1.05), ("cw", 1.05)])
def test_fast_budget_is_never_below_and_near_exact(problems, name, median):
    r, seconds = ratios(problems, name, "fast")
    print(summary(name, "fast", r, seconds))
    assert never_below_exact(r, problems)  # a failure (inf) is not below
    assert np.median(r) <= median


@pytest.mark.parametrize("attack", [ddn, fmn], ids=["ddn", "fmn"])
def test_restarts_keep_the_best_run_and_are_repeatable(problems, attack):
    """The first run is the plain attack, so more restarts can only lower a distance, and they do."""
    single, multi = [], []
    for net, x, y, exact in problems:
        single.append(run_attack(net, x, y, attack, steps=100).distances.numpy() / exact)
        multi.append(run_attack(net, x, y, attack, steps=100, restarts=3).distances.numpy() / exact)
    net, x, y, _ = problems[0]
    assert torch.equal(attack(net, x, y, steps=20, restarts=2), attack(net, x, y, steps=20, restarts=2))
    single, multi = np.concatenate(single), np.concatenate(multi)
    assert np.all(multi <= single)
    assert multi.max() < single.max() and np.mean(multi < single * (1 - 1e-3)) > 0.05


@pytest.mark.slow
def test_reference_cw_median_within_one_percent(problems):
    """CW at its reference settings (9 x 10000 steps, abort early); ~3 minutes on one core."""
    r, seconds = ratios(problems, "cw", "reference")
    print(summary("cw", "reference", r, seconds))
    assert never_below_exact(r, problems)
    assert np.median(r) <= 1.01


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddn", "fmn"])
def test_restarted_attacks_never_below_and_median_within_five_percent(problems, name):
    r, seconds = ratios(problems, name, "strong")
    print(summary(name, "strong", r, seconds))
    assert never_below_exact(r, problems)
    assert np.median(r) <= 1.05


@pytest.mark.slow
def test_strong_ensemble_within_five_percent_everywhere(problems):
    runs = [ratios(problems, name, "strong") for name in ENSEMBLES["strong"]]
    r = per_sample_minimum(torch.from_numpy(run) for run, _ in runs).numpy()
    seconds = sum(s for _, s in runs)
    print(summary("strong", "ensemble", r, seconds))
    assert never_below_exact(r, problems)
    assert r.max() <= 1.05, f"worst point {r.max():.4f}"
