"""The paper's claims checked on one run: tables/claims.csv, one row per claim, split and statistic.

A verdict is `held`, `did not hold` or `inconclusive`, or `not measured` when the run lacks the data. A claim
reports one or more statistics, and its verdict is decided on all of them together:

- each statistic has a null value (0 for a change, 1/2 for a share) and, where it is a sample over points, a
  p-value: Wilcoxon signed-rank for the median log-ratio, exact binomial for a share, exact McNemar for a
  paired change of accuracy;
- the p-values of one verdict are corrected together by Holm's step-down method (family-wise level
  ALPHA = 5 %), and each statistic's interval is taken at its Holm level (1 − ALPHA/(m − k) for the k-th
  smallest of m p-values; 95 % when m = 1);
- a statistic is *clear* of its null when its Holm-adjusted p is below ALPHA and its interval lies wholly on
  one side of the null; the interval's side is its direction (the test alone may disagree with the
  statistic's direction: Wilcoxon tests a pseudo-median, not the median);
- the claim `held` only when every statistic is clear in the claim's direction, `did not hold` when any is
  clear the other way, and is `inconclusive` otherwise.

Training trajectories (C1-C3) are one deterministic run each: their numbers have no sampling interval, so a
statistic is clear when its value lies strictly on one side of the null, and the same all/any rule applies
to C1's two margin definitions and C3's two comparisons. C7 asks for *no* change: its null is a change of
at least ±TEST_ACC_TOLERANCE, so it holds when the 95 % interval lies within that band and does not hold when
the interval lies wholly outside it and McNemar's test rejects no change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from robustmargin.stats import (HELD, INCONCLUSIVE, NOT_HELD, binomial_interval, binomial_p, bootstrap_interval,
                                equivalence_verdict, holm, joint_verdict, mcnemar_p, paired_mean_change,
                                signed_rank_p)

CLAIM_COLUMNS = ("claim", "verdict", "statistic", "estimate", "ci_low", "ci_high", "p_value", "n", "detail")
CLAIMS = {
    "C1": "The normalized margin grows after the training set is separated.",
    "C2": "The smoothed normalized margin never decreases after separation.",
    "C3": "Loss-based training decreases the loss exponentially faster than a constant learning rate.",
    "C6": "Robustness grows from the first to the last attacked checkpoint.",
    "C7": "Clean test accuracy barely changes from the first to the last checkpoint.",
}
CLAIMS_DESCRIPTION = (
    "The paper's claims checked on this run: one row per claim, split and statistic. Sampled statistics "
    "(over points, paired) carry a p-value (Wilcoxon signed-rank for the median log-ratio, exact binomial for "
    "a share, exact McNemar for a change of accuracy), Holm-adjusted over the statistics of one verdict, and "
    "an interval at that statistic's Holm level (percentile bootstrap; Clopper-Pearson for a share). A "
    "statistic is clear of its null when its adjusted p < 0.05 and its interval lies on one side. The "
    "verdict (per claim and split) is held only when every statistic is clear in the claim's direction, did "
    "not hold when any is clear the other way, inconclusive otherwise; one-run training trajectories "
    "(C1-C3) have no interval and compare values directly. C7 holds when the 95 % interval of the change "
    "lies within ±2 points. The detail names the split, the checkpoints compared and the reason.")
NOT_MEASURED = "not measured"
ALPHA = 0.05               # family-wise error rate of one verdict
TEST_ACC_TOLERANCE = 0.02  # "barely changes": the interval of the change lies within ±2 percentage points
DECADES_FACTOR = 2.0       # "exponentially faster": at least twice the decades of loss at equal cost
N_BOOT = 2000


def _row(claim: str, verdict: str, statistic: str, detail: str, estimate: float = math.nan,
         ci: tuple[float, float] = (math.nan, math.nan), p_value: float = math.nan, n: int | None = None) -> dict:
    return {"claim": claim, "verdict": verdict, "statistic": statistic, "estimate": estimate,
            "ci_low": ci[0], "ci_high": ci[1], "p_value": p_value, "n": n, "detail": detail}


def _sign(value: float, null: float = 0.0) -> int:
    """+1 above the null, -1 below, 0 at it or undefined: the clear side of an exact (unsampled) number."""
    return 0 if not math.isfinite(value) or value == null else 1 if value > null else -1


def _apply(rows: list[dict], signs: list[int], reason: Callable[[str], str]) -> list[dict]:
    """Give every row of one claim the joint verdict of its statistics, and say why in the detail."""
    verdict = joint_verdict(signs)
    against = [r["statistic"] for r, s in zip(rows, signs) if s < 0]
    unclear = [r["statistic"] for r, s in zip(rows, signs) if s == 0]
    why = (f"did not hold by {', '.join(against)}" if verdict == NOT_HELD
           else f"inconclusive: {', '.join(unclear)} not clear of the null" if verdict == INCONCLUSIVE
           else f"held by all {len(rows)} statistics")
    for r in rows:
        r["verdict"] = verdict
        r["detail"] = f"{r['detail']}; {reason(why)}"
    return rows


# ----------------------------------------------------------------------------- one-run trajectories (C1-C3)

def _separation(metrics: pd.DataFrame) -> pd.DataFrame | None:
    """The rows from the first epoch with 100 % training accuracy on, or None if it never came."""
    separated = np.flatnonzero(metrics["train_acc"].to_numpy() >= 1.0)
    return metrics.iloc[separated[0]:] if len(separated) else None


def margin_growth_rows(metrics: pd.DataFrame) -> list[dict]:
    """C1 for both margin definitions; held only when both grew, did not hold when either shrank."""
    after = _separation(metrics)
    after = None if after is None else after[np.isfinite(after["normalized_margin"])]
    if after is None or len(after) < 2:
        return [_row("C1", NOT_MEASURED, "relative_margin_change",
                     "the run never kept 100 % training accuracy for two epochs")]
    first, last = after.iloc[0], after.iloc[-1]
    rows, signs = [], []
    for column, name in (("normalized_margin", "q_min/ρ^L"), ("normalized_margin_layerwise", "q_min/∏ρ_i^a_i")):
        a, b = float(first[column]), float(last[column])
        change = (b - a) / abs(a) if a else math.nan
        signs.append(_sign(b - a))
        rows.append(_row("C1", "", f"relative_margin_change ({column})",
                         f"train: {name} {a:.4g} at epoch {int(first['epoch'])} (separation) → {b:.4g} at epoch "
                         f"{int(last['epoch'])}; one training run, no sampling interval", change,
                         n=len(after)))
    return _apply(rows, signs, lambda why: f"claim {why}")


def smoothed_monotone_rows(metrics: pd.DataFrame) -> list[dict]:
    after = _separation(metrics)
    values = None if after is None else after["smoothed_normalized_margin"].to_numpy(dtype=float)
    values = None if values is None else values[np.isfinite(values)]
    if values is None or len(values) < 2:
        return [_row("C2", NOT_MEASURED, "decreases",
                     "fewer than two separated epochs with a finite smoothed margin")]
    prev, cur = values[:-1], values[1:]
    drops = cur < prev
    count = int(drops.sum())
    largest = float(np.max((prev[drops] - cur[drops]) / np.abs(prev[drops]))) if count else 0.0
    verdict = HELD if not count else NOT_HELD
    note = ("" if not count else "; the theorem covers gradient flow and small-step gradient descent, "
                                 "SGD steps may dip")
    detail = (f"train: {count} decrease{'s' * (count != 1)} over {len(values) - 1} epoch steps after separation "
              f"({values[0]:.4g} → {values[-1]:.4g}){note}")
    return [_row("C2", verdict, "decreases", detail, float(count), n=len(values) - 1),
            _row("C2", verdict, "largest_relative_dip", detail, largest, n=len(values) - 1)]


def _value_at(metrics: pd.DataFrame, column: str, limit: float) -> float:
    """log10 loss of the last row whose `column` is at most `limit`."""
    rows = metrics[metrics[column] <= limit]
    return float(rows["log10_loss"].iloc[-1]) if len(rows) else math.nan


def schedule_rows(runs: dict[str, tuple[str, pd.DataFrame]]) -> list[dict]:
    """The loss-based run against the constant-LR run at equal epochs and equal gradient evaluations."""
    by_schedule: dict[str, pd.DataFrame] = {}
    for schedule, metrics in runs.values():
        by_schedule.setdefault(schedule, metrics)
    if "loss-based" not in by_schedule or "constant" not in by_schedule:
        missing = "constant" if "constant" not in by_schedule else "loss-based"
        return [_row("C3", NOT_MEASURED, "decades_ratio",
                     f"no {missing}-schedule run (add a companion under RUN/companions/)")]
    fast, slow = by_schedule["loss-based"], by_schedule["constant"]
    rows, signs = [], []
    for column, what in (("epoch", "epochs"), ("grad_evals", "gradient evaluations")):
        if column not in fast or column not in slow or fast[column].isna().all() or slow[column].isna().all():
            continue
        limit = min(fast[column].max(), slow[column].max())
        lf, ls = _value_at(fast, column, limit), _value_at(slow, column, limit)
        ratio = lf / ls if ls < 0 else math.nan
        signs.append(1 if (lf <= DECADES_FACTOR * ls if ls < 0 else lf < ls) else -1)
        rows.append(_row("C3", "", f"decades_ratio_at_equal_{column}",
                         f"after {limit:.4g} {what}: loss-based 10^{lf:.1f}, constant 10^{ls:.1f} (held at a "
                         f"ratio of at least {DECADES_FACTOR:g}); one run each, no sampling interval", ratio))
    if not rows:
        return [_row("C3", NOT_MEASURED, "decades_ratio", "the runs record neither epochs nor gradient evaluations")]
    return _apply(rows, signs, lambda why: f"claim {why}")


# ----------------------------------------------------------------------------- sampled over points (C6, C7)

@dataclass
class _Test:
    """One sampled statistic of a verdict: its p-value, and its interval at any level."""
    statistic: str
    detail: str
    estimate: float
    p_value: float
    interval: Callable[[float], tuple[float, float]]
    null: float
    n: int


def _decide(claim: str, tests: list[_Test], where: str) -> list[dict]:
    """Rows of one verdict: Holm over the tests' p-values, intervals at each test's Holm level."""
    adjusted, levels = holm([t.p_value for t in tests], ALPHA)
    rows, signs = [], []
    for t, p_adj, alpha in zip(tests, adjusted, levels):
        low, high = t.interval(1 - alpha)
        clear = p_adj < ALPHA and np.isfinite(low) and np.isfinite(high)
        signs.append(1 if clear and low > t.null else -1 if clear and high < t.null else 0)
        rows.append(_row(claim, "", t.statistic,
                         f"{t.detail}; p = {t.p_value:.2g} before Holm over {len(tests)}, interval at "
                         f"{100 * (1 - alpha):.4g} %", t.estimate, (low, high), p_adj, t.n))
    return _apply(rows, signs, lambda why: f"{where} verdict {why}")


def clean_accuracy_rows(margins: pd.DataFrame | None, epochs: dict[str, int]) -> list[dict]:
    """Test accuracy at the first and the last checkpoint, paired over the same test points (margin > 0)."""
    test = None if margins is None else margins[margins["split"] == "test"]
    names = [] if test is None else sorted(set(test["checkpoint"]), key=lambda c: epochs.get(c, math.inf))
    if len(names) < 2:
        return [_row("C7", NOT_MEASURED, "test_accuracy_change", "fewer than two checkpoints with test margins")]
    first, last = names[0], names[-1]
    a = test[test["checkpoint"] == first].set_index("index")["margin"]
    b = test[test["checkpoint"] == last].set_index("index")["margin"]
    common = a.index.intersection(b.index)
    before, after = a[common].to_numpy() > 0, b[common].to_numpy() > 0
    est, low, high = paired_mean_change(before, after, n_boot=N_BOOT, level=1 - ALPHA)
    p = mcnemar_p(before, after)
    verdict = equivalence_verdict(low, high, tolerance=TEST_ACC_TOLERANCE)
    if verdict == NOT_HELD and not p < ALPHA:  # outside the band, yet no change cannot be ruled out
        verdict = INCONCLUSIVE
    return [_row("C7", verdict, "test_accuracy_change", f"test: {first} {100 * before.mean():.2f} % → {last} "
                 f"{100 * after.mean():.2f} %, paired over the same points (exact McNemar p of no change); held "
                 f"when the 95 % interval lies within ±{100 * TEST_ACC_TOLERANCE:g} points", est, (low, high), p,
                 n=len(common))]


def _robustness_split(split: str, first: pd.DataFrame, last: pd.DataFrame, names: tuple[str, str],
                      epsilons: list[float]) -> list[dict]:
    pair = first.merge(last, on="index", suffixes=("_first", "_last"))
    d0, d1 = pair["distance_first"].to_numpy(float), pair["distance_last"].to_numpy(float)
    where = f"{split}: {names[0]} → {names[1]}"
    # the log-ratio is defined only where both distances are positive and finite (correct, attack succeeded)
    usable = (d0 > 0) & (d1 > 0) & np.isfinite(d0) & np.isfinite(d1)
    n_use = int(usable.sum())
    tests = []
    if n_use >= 2:
        logr = np.log(d1[usable] / d0[usable])
        grew = int((logr > 0).sum())
        tests.append(_Test("median_log_distance_ratio",
                           f"{where}, over the {n_use} of {len(pair)} points correct and attacked successfully "
                           f"at both (Wilcoxon signed-rank p)", float(np.median(logr)), signed_rank_p(logr),
                           lambda level: bootstrap_interval(np.median, logr, n_boot=N_BOOT, level=level)[1:],
                           0.0, n_use))
        tests.append(_Test("share_distance_grew", f"{where}, same points (exact binomial p against 1/2)",
                           grew / n_use, binomial_p(grew, n_use),
                           lambda level: binomial_interval(grew, n_use, level), 0.5, n_use))
    # robust accuracy over every paired point: misclassified (0) is never robust, a failed attack (inf) is
    for eps in epsilons:
        before, after = d0 > eps, d1 > eps
        tests.append(_Test(f"robust_accuracy_change_eps_{eps:g}",
                           f"{where}, all {len(pair)} points: {100 * before.mean():.1f} % → "
                           f"{100 * after.mean():.1f} % at ε = {eps:g} (exact McNemar p)",
                           float(after.mean() - before.mean()), mcnemar_p(before, after),
                           lambda level, b=before, a=after: paired_mean_change(b, a, n_boot=N_BOOT, level=level)[1:],
                           0.0, len(pair)))
    return _decide("C6", tests, "split") if tests else []


def robustness_rows(points: pd.DataFrame | None, epochs: dict[str, int], epsilons: list[float]) -> list[dict]:
    """C6, per attacked split: the first and the last *attacked* checkpoint by epoch, paired over points."""
    if points is None or points.empty:
        return [_row("C6", NOT_MEASURED, "median_log_distance_ratio",
                     "no attack distances (run `robustmargin attack`)")]
    rows = []
    for split in ("train", "test"):  # a split that was not attacked gets no row
        part = points[points["split"] == split]
        if part.empty:
            continue
        names = sorted(set(part["checkpoint"]), key=lambda c: (epochs.get(c, math.inf), c))
        if len(names) < 2:
            rows.append(_row("C6", NOT_MEASURED, "median_log_distance_ratio",
                             f"{split}: only {names[0]} was attacked; two attacked checkpoints are needed"))
            continue
        first, last = (part[part["checkpoint"] == c][["index", "distance"]] for c in (names[0], names[-1]))
        rows += _robustness_split(split, first, last, (names[0], names[-1]), epsilons)
    return rows


def claims_table(metrics: pd.DataFrame, tables: dict[str, pd.DataFrame], points: pd.DataFrame | None,
                 runs: dict[str, tuple[str, pd.DataFrame]], epsilons: list[float]) -> pd.DataFrame:
    epochs = dict(zip(tables["table1"]["checkpoint"], tables["table1"]["epoch"]))
    rows = (margin_growth_rows(metrics) + smoothed_monotone_rows(metrics) + schedule_rows(runs)
            + robustness_rows(points, epochs, epsilons) + clean_accuracy_rows(tables.get("margins"), epochs))
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS)).astype({"n": "Int64"})
