"""Robust-accuracy curves from per-sample distances (0 = misclassified, inf = attack failure)."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustmargin.errors import UserError
from robustmargin.robustness import (
    curves_frame,
    default_epsilons,
    ensemble_distances,
    per_sample_best,
    resolve_attacks,
    robust_accuracy_curve,
)


def test_curve_counts_strictly_larger_distances():
    d = [0.0, 0.5, 1.0, math.inf]
    acc = robust_accuracy_curve(d, [0.0, 0.25, 0.5, 0.75, 1.0, 100.0])
    assert acc.tolist() == [0.75, 0.75, 0.5, 0.5, 0.25, 0.25]
    assert acc.dtype == torch.float64


def test_curve_at_zero_is_clean_accuracy_and_failures_stay_robust():
    d = torch.tensor([0.0, 0.0, 0.3, math.inf, math.inf])
    acc = robust_accuracy_curve(d, [0.0, 1e9])
    assert float(acc[0]) == pytest.approx(3 / 5)  # three points correctly classified
    assert float(acc[1]) == pytest.approx(2 / 5)  # both failures count as robust at any ε


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.just(math.inf), st.floats(0, 10)), min_size=1, max_size=40))
def test_curve_is_non_increasing(values):
    eps = default_epsilons(values)
    acc = robust_accuracy_curve(values, eps)
    assert bool((acc[1:] <= acc[:-1]).all())
    assert float(acc[0]) == pytest.approx(sum(v > 0 for v in values) / len(values))
    assert float(acc[-1]) == pytest.approx(sum(math.isinf(v) for v in values) / len(values))


def test_default_grid_covers_the_largest_finite_distance():
    eps = default_epsilons([0.0, 0.8, 2.34, math.inf])
    assert len(eps) == 101 and float(eps[0]) == 0.0
    assert 2.34 < float(eps[-1]) <= 2.34 * 1.1
    assert float(default_epsilons([0.0, math.inf])[-1]) == 1.0


def test_bad_distances_are_user_errors():
    with pytest.raises(UserError):
        robust_accuracy_curve([0.1, math.nan], [0.0])
    with pytest.raises(UserError):
        robust_accuracy_curve([-0.1], [0.0])


def test_ensemble_and_frames_take_per_sample_minimum():
    assert ensemble_distances([torch.tensor([1.0, math.inf, 0.0]), torch.tensor([2.0, 3.0, 0.0])]).tolist() == [
        1.0, 3.0, 0.0]
    rows = []
    for attack, ds in (("ddn", [0.0, 1.0, math.inf]), ("cw", [0.0, 0.5, math.inf])):
        for i, d in enumerate(ds):
            rows.append({"checkpoint": "m1", "split": "test", "index": i, "label": 3, "correct": int(d > 0),
                         "attack": attack, "distance": d})
    frame = pd.DataFrame(rows)
    best = per_sample_best(frame)
    assert best["distance"].tolist() == [0.0, 0.5, math.inf]
    curves = curves_frame(frame, epsilons=[0.0, 0.4, 0.6])
    assert list(curves.columns) == ["checkpoint", "split", "epsilon", "robust_accuracy"]
    assert curves["robust_accuracy"].tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 3])


def test_resolve_attacks():
    assert resolve_attacks("ensemble") == ["ddn", "fmn"]
    assert resolve_attacks("cw, ddn,cw") == ["cw", "ddn"]
    with pytest.raises(UserError, match="unknown attack"):
        resolve_attacks("ddn,pgd")


def test_curve_grid_is_float64_from_the_start():
    frame = pd.DataFrame([{"checkpoint": "c", "split": "test", "index": 0, "label": 1, "correct": 1,
                           "attack": "ddn", "distance": 0.1000000001}])
    curves = curves_frame(frame, epsilons=[0.1])
    assert curves["epsilon"].tolist() == [0.1]
    assert curves["robust_accuracy"].tolist() == [1.0]  # float32(0.1) > d would give 0
