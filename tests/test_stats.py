"""Statistics behind the verdicts: interval coverage on a known distribution, verdicts by interval, and the
robustness claim on hand-built paired distances (a shift that holds, none that is inconclusive, a reversal)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from robustmargin.analysis import robustness_rows
from robustmargin.stats import (HELD, INCONCLUSIVE, NOT_HELD, bootstrap_interval, equivalence_verdict,
                                interval_verdict, paired_mean_change, signed_rank_p)


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


def points(log_shift: float, *, n: int = 400, noise: float = 0.05, seed: int = 0,
           checkpoints=(("first", "train"), ("last", "train"), ("first", "test"), ("last", "test"))) -> pd.DataFrame:
    """Per-point distances: the last checkpoint's are the earlier ones' times exp(log_shift + noise), per point."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.5, 3.0, n)
    rows = []
    for name, split in checkpoints:
        d = base if name != "last" else base * np.exp(log_shift + rng.normal(0, noise, n))
        rows.append(pd.DataFrame({"checkpoint": name, "split": split, "index": np.arange(n), "distance": d}))
    return pd.concat(rows, ignore_index=True)


EPOCHS = {"first": 10, "middle": 20, "last": 30}
GRID = [1.0, 2.0]


def verdicts(rows: list[dict]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(r["detail"].split(":")[0], set()).add(r["verdict"])
    return out


def test_a_shift_holds_none_is_inconclusive_a_reversal_does_not_hold():
    assert verdicts(robustness_rows(points(0.05), EPOCHS, GRID)) == {"train": {HELD}, "test": {HELD}}
    assert verdicts(robustness_rows(points(0.0), EPOCHS, GRID)) == {"train": {INCONCLUSIVE}, "test": {INCONCLUSIVE}}
    assert verdicts(robustness_rows(points(-0.05), EPOCHS, GRID)) == {"train": {NOT_HELD}, "test": {NOT_HELD}}


def test_robustness_rows_report_every_statistic():
    rows = {r["statistic"]: r for r in robustness_rows(points(0.05), EPOCHS, GRID) if r["detail"].startswith("train")}
    assert set(rows) == {"median_log_distance_ratio", "share_distance_grew", "robust_accuracy_change_eps_1",
                         "robust_accuracy_change_eps_2"}
    med = rows["median_log_distance_ratio"]
    assert med["ci_low"] < 0.05 < med["ci_high"] and med["p_value"] < 1e-6 and med["n"] == 400
    assert rows["share_distance_grew"]["estimate"] > 0.75
    assert "first → last" in med["detail"]


def test_misclassified_and_failed_points_leave_the_log_ratio_but_count_in_accuracy():
    frame = points(0.0, n=100)
    last_train = (frame["checkpoint"] == "last") & (frame["split"] == "train")
    frame.loc[last_train & (frame["index"] < 10), "distance"] = 0.0      # misclassified at the end
    frame.loc[last_train & frame["index"].between(10, 14), "distance"] = math.inf  # attack failed
    rows = {r["statistic"]: r for r in robustness_rows(frame, EPOCHS, GRID) if r["detail"].startswith("train")}
    assert rows["median_log_distance_ratio"]["n"] == 85
    acc = rows["robust_accuracy_change_eps_1"]
    before = (frame[(frame["checkpoint"] == "first") & (frame["split"] == "train")]["distance"] > 1.0).to_numpy()
    after = (frame[last_train]["distance"] > 1.0).to_numpy()
    assert acc["n"] == 100 and acc["estimate"] == pytest.approx(after.mean() - before.mean())


def test_only_attacked_checkpoints_and_splits_count():
    # the README's `attack --split test --checkpoints loss_1e-20,final` on a run with a third checkpoint:
    # the test split compares exactly those two, the train split (never attacked) gets no row
    frame = points(0.05, checkpoints=(("middle", "test"), ("last", "test")))
    frame["checkpoint"] = frame["checkpoint"].replace({"middle": "loss_1e-20", "last": "final"})
    rows = robustness_rows(frame, {"loss_1e-10": 5, "loss_1e-20": 20, "final": 30}, GRID)
    assert {r["detail"].split(":")[0] for r in rows} == {"test"}
    assert all("loss_1e-20 → final" in r["detail"] and r["verdict"] == HELD for r in rows)
    one = robustness_rows(frame[frame["checkpoint"] == "final"], {"final": 30}, GRID)
    assert len(one) == 1 and one[0]["verdict"] == "not measured" and "only final was attacked" in one[0]["detail"]
    none = robustness_rows(None, {}, GRID)
    assert len(none) == 1 and none[0]["verdict"] == "not measured"
