"""The paper's claims on constructed data whose verdict is known: trajectories that grow, shrink or dip,
paired distances that shift up, not at all, down, or some ways up and others down; a verdict holds only when
every statistic it reports is clear of its null, Holm-corrected, and fails when any is clear the other way."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from robustmargin import claims
from robustmargin.claims import clean_accuracy_rows, robustness_rows
from robustmargin.stats import HELD, INCONCLUSIVE, NOT_HELD
from crafted import crafted_metrics


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


def paired(first: np.ndarray, last: np.ndarray, split: str = "test") -> pd.DataFrame:
    """Distances of the same points at the first and the last checkpoint of one split."""
    n = len(first)
    return pd.concat([pd.DataFrame({"checkpoint": name, "split": split, "index": np.arange(n), "distance": d})
                      for name, d in (("first", first), ("last", last))], ignore_index=True)


def test_robustness_contradicted_by_its_median_does_not_hold():
    # 200 points grow from 1.45 to 1.55 and 250 shrink from 3.0 to 2.7: the median log-ratio (-0.105) and the
    # share that grew (0.44) both point down, though robust accuracy at ε = 1.5 rises by 0.44
    first = np.r_[np.full(200, 1.45), np.full(250, 3.0)]
    last = np.r_[np.full(200, 1.55), np.full(250, 2.7)]
    rows = {r["statistic"]: r for r in robustness_rows(paired(first, last), EPOCHS, [1.5])}
    assert {r["verdict"] for r in rows.values()} == {NOT_HELD}
    med, share, acc = (rows[k] for k in ("median_log_distance_ratio", "share_distance_grew",
                                         "robust_accuracy_change_eps_1.5"))
    assert med["estimate"] == pytest.approx(math.log(0.9)) and med["ci_high"] < 0 and med["p_value"] < 1e-6
    assert share["estimate"] == pytest.approx(200 / 450) and share["ci_high"] < 0.5
    assert acc["estimate"] == pytest.approx(200 / 450) and acc["ci_low"] > 0
    assert "did not hold by median_log_distance_ratio" in med["detail"]


def test_robustness_that_grows_everywhere_holds():
    rng = np.random.default_rng(1)
    first = rng.uniform(0.5, 3.0, 300)
    last = first * np.exp(0.1 + rng.normal(0, 0.02, 300))
    rows = robustness_rows(paired(first, last), EPOCHS, [1.0, 1.5, 2.0])
    assert len(rows) == 5 and {r["verdict"] for r in rows} == {HELD}
    assert all(r["p_value"] < 0.05 for r in rows)
    acc = [r for r in rows if r["statistic"].startswith("robust_accuracy")]
    assert all(r["ci_low"] > 0 for r in acc)


def test_noise_without_a_shift_is_inconclusive():
    rng = np.random.default_rng(2)
    first = rng.uniform(0.5, 3.0, 300)
    last = first * np.exp(rng.normal(0, 0.1, 300))
    rows = robustness_rows(paired(first, last), EPOCHS, [1.0, 2.0])
    assert {r["verdict"] for r in rows} == {INCONCLUSIVE}
    assert "not clear of the null" in rows[0]["detail"]


@pytest.mark.parametrize("rising", [1.0, 3.0])
def test_robust_accuracy_up_at_one_eps_and_down_at_others_does_not_hold(rising):
    # 60 points cross each ε: upwards at `rising`, downwards at the other two; the rest stay far from every ε
    # (rising = 3: the largest ε, which alone once decided the verdict, goes up)
    grid = [1.0, 2.0, 3.0]
    step = [0.05 if eps == rising else -0.05 for eps in grid]
    first = np.concatenate([np.full(60, eps - s) for eps, s in zip(grid, step)] + [np.full(120, 5.0)])
    last = np.concatenate([np.full(60, eps + s) for eps, s in zip(grid, step)] + [np.full(120, 5.0)])
    rows = {r["statistic"]: r for r in robustness_rows(paired(first, last), EPOCHS, grid)}
    assert {r["verdict"] for r in rows.values()} == {NOT_HELD}
    for eps in grid:
        acc = rows[f"robust_accuracy_change_eps_{eps:g}"]
        assert acc["ci_low"] > 0 if eps == rising else acc["ci_high"] < 0
        if eps != rising:
            assert f"robust_accuracy_change_eps_{eps:g}" in acc["detail"].split("did not hold by")[1]


def test_a_statistic_that_did_not_move_keeps_the_claim_inconclusive():
    # every distance grows by 5 %, but none crosses ε = 10: robust accuracy there is 0 → 0, no evidence
    rng = np.random.default_rng(3)
    first = rng.uniform(0.5, 3.0, 300)
    rows = {r["statistic"]: r for r in robustness_rows(paired(first, first * 1.05), EPOCHS, [10.0])}
    assert {r["verdict"] for r in rows.values()} == {INCONCLUSIVE}
    assert rows["median_log_distance_ratio"]["ci_low"] > 0 and rows["robust_accuracy_change_eps_10"]["p_value"] == 1


def test_holm_levels_widen_the_intervals_and_adjust_p():
    rng = np.random.default_rng(4)
    first = rng.uniform(0.5, 3.0, 300)
    last = first * np.exp(0.05 + rng.normal(0, 0.05, 300))
    one = {r["statistic"]: r for r in robustness_rows(paired(first, last), EPOCHS, [])}
    many = {r["statistic"]: r for r in robustness_rows(paired(first, last), EPOCHS, [1.0, 1.5, 2.0, 2.5])}
    for k in ("median_log_distance_ratio", "share_distance_grew"):
        assert many[k]["ci_high"] - many[k]["ci_low"] > one[k]["ci_high"] - one[k]["ci_low"]
        assert many[k]["p_value"] >= one[k]["p_value"]
    assert "before Holm over 6" in many["share_distance_grew"]["detail"]


def test_a_one_sided_p_too_weak_after_holm_is_inconclusive():
    # 300 points grow clearly, but at ε = 1 only 7 points cross up and 1 down: McNemar p = 0.07 alone is not
    # clear, so the claim cannot hold on it
    first = np.r_[np.full(7, 0.98), np.full(1, 1.02), np.linspace(1.5, 3.0, 292)]
    last = np.r_[np.full(7, 1.02), np.full(1, 0.98), np.linspace(1.5, 3.0, 292) * 1.1]
    rows = {r["statistic"]: r for r in robustness_rows(paired(first, last), EPOCHS, [1.0])}
    acc = rows["robust_accuracy_change_eps_1"]
    assert acc["estimate"] == pytest.approx(6 / 300) and acc["p_value"] > 0.05
    assert {r["verdict"] for r in rows.values()} == {INCONCLUSIVE}


def _verdict(rows: list[dict]) -> str:
    assert len({r["verdict"] for r in rows}) == 1
    return rows[0]["verdict"]


def test_margin_growth_claim():
    assert _verdict(claims.margin_growth_rows(crafted_metrics())) == "held"
    shrinking = claims.margin_growth_rows(crafted_metrics(margin_slope=-0.01, separate_at=0))
    assert _verdict(shrinking) == "did not hold" and "epoch 0" in shrinking[0]["detail"]
    assert shrinking[0]["estimate"] < 0
    never = crafted_metrics(separate_at=99)
    assert _verdict(claims.margin_growth_rows(never)) == "not measured"
    assert _verdict(claims.smoothed_monotone_rows(never)) == "not measured"


def test_margin_growth_needs_both_margins():
    # the normalized margin grows, the layer-wise one shrinks: the claim does not hold, on both rows
    metrics = crafted_metrics(separate_at=6)
    metrics["normalized_margin_layerwise"] = metrics["normalized_margin_layerwise"].to_numpy()[::-1]
    rows = claims.margin_growth_rows(metrics)
    assert rows[0]["estimate"] > 0 > rows[1]["estimate"]
    assert _verdict(rows) == "did not hold"
    assert "did not hold by relative_margin_change (normalized_margin_layerwise)" in rows[0]["detail"]
    flat = crafted_metrics()
    flat["normalized_margin_layerwise"] = 0.5  # unchanged: neither grew nor shrank
    assert _verdict(claims.margin_growth_rows(flat)) == "inconclusive"


def test_smoothed_monotone_claim_counts_decreases():
    assert _verdict(claims.smoothed_monotone_rows(crafted_metrics())) == "held"
    rows = {r["statistic"]: r for r in claims.smoothed_monotone_rows(crafted_metrics(dips=(8, 12)))}
    assert rows["decreases"]["verdict"] == "did not hold" and rows["decreases"]["estimate"] == 2
    assert rows["decreases"]["n"] == 15
    assert rows["largest_relative_dip"]["estimate"] == pytest.approx(0.01, rel=0.05)
    # a dip before separation does not count
    assert _verdict(claims.smoothed_monotone_rows(crafted_metrics(dips=(3,)))) == "held"


def test_metrics_with_skipped_cells_still_give_claims():
    metrics = crafted_metrics()
    metrics.loc[metrics["epoch"] % 2 == 1, "test_acc"] = np.nan  # train.metrics_every = 2 leaves cells empty
    assert _verdict(claims.margin_growth_rows(metrics)) == "held"


def test_schedule_claim():
    fast, slow = crafted_metrics(loss_per_epoch=-2.0, evals_per_epoch=3), crafted_metrics(loss_per_epoch=-0.25,
                                                                                         evals_per_epoch=1)
    rows = claims.schedule_rows({"a": ("loss-based", fast), "b": ("constant", slow)})
    assert _verdict(rows) == "held"
    # at 20 gradient evaluations the loss-based run is at epoch 6 (10^-12), the constant one at 10^-5
    assert "after 20 epochs: loss-based 10^-40.0, constant 10^-5.0" in rows[0]["detail"]
    assert "after 20 gradient evaluations: loss-based 10^-12.0, constant 10^-5.0" in rows[1]["detail"]
    assert rows[0]["estimate"] == pytest.approx(8.0) and rows[1]["estimate"] == pytest.approx(12 / 5)
    close = crafted_metrics(loss_per_epoch=-0.4, evals_per_epoch=1)
    assert _verdict(claims.schedule_rows({"a": ("loss-based", close), "b": ("constant", slow)})) == "did not hold"
    assert _verdict(claims.schedule_rows({"a": ("loss-based", fast)})) == "not measured"
    # ahead at equal epochs (8×) but not at equal gradient evaluations (1.6×): both comparisons are needed
    costly = crafted_metrics(loss_per_epoch=-2.0, evals_per_epoch=5)
    rows = claims.schedule_rows({"a": ("loss-based", costly), "b": ("constant", slow)})
    assert rows[0]["estimate"] > 2 > rows[1]["estimate"] and _verdict(rows) == "did not hold"


def _test_margins(first: np.ndarray, last: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"checkpoint": ["a"] * len(first) + ["z"] * len(last), "split": "test",
                         "index": np.r_[np.arange(len(first)), np.arange(len(last))], "margin": np.r_[first, last]})


def test_clean_accuracy_claim_by_paired_interval():
    rng = np.random.default_rng(0)
    q = rng.normal(1.0, 1.0, 2000)
    epochs = {"a": 1, "z": 2}
    same = clean_accuracy_rows(_test_margins(q, q + rng.normal(0, 0.01, 2000)), epochs)
    assert _verdict(same) == "held" and abs(same[0]["estimate"]) < 0.01
    worse = clean_accuracy_rows(_test_margins(q, q - 0.5), epochs)  # ~18 points of accuracy lost
    assert _verdict(worse) == "did not hold" and worse[0]["ci_high"] < -0.1 and worse[0]["p_value"] < 1e-6
    # 20 points, two lost and two gained: no change on average, but far too few points to tell
    first, last = np.ones(20), np.ones(20)
    first[:2], last[2:4] = -1.0, -1.0
    few = clean_accuracy_rows(_test_margins(first, last), epochs)
    assert _verdict(few) == "inconclusive" and few[0]["estimate"] == 0 and few[0]["ci_high"] > 0.05
    assert few[0]["p_value"] == pytest.approx(1.0)
    assert _verdict(clean_accuracy_rows(None, epochs)) == "not measured"


def test_clean_accuracy_drop_the_exact_test_cannot_confirm_is_inconclusive():
    # 30 points, 5 lost and none gained: the bootstrap interval lies below -2 points, but McNemar's exact p
    # (2 / 2^5 = 0.0625) cannot rule out no change
    first, last = np.ones(30), np.ones(30)
    last[:5] = -1.0
    rows = clean_accuracy_rows(_test_margins(first, last), {"a": 1, "z": 2})
    assert rows[0]["ci_high"] < -0.02 and rows[0]["p_value"] == pytest.approx(0.0625)
    assert _verdict(rows) == "inconclusive"
