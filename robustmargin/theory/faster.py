"""Faster margin maximization on the linear case: gradient descent (constant step on S), normalized GD
(θ ← θ − η ∇log S) and progressive rescaling GD (PRGD; Wang et al. 2023, arXiv 2311.14387) side by side.

PRGD here is our reading of the idea: normalized GD steps, and every `period` steps θ is rescaled by
`factor` > 1. The normalized margin of log S at radius R is the max-margin objective smoothed at
temperature 1/R (error ≤ log N / R), so growing R geometrically while the steps keep their size drives
the margin gap down geometrically in the number of steps, where GD gets O(1/log t) and normalized GD O(1/t).
Rates fitted: GD and normalized GD, the slope of log gap against log log k and log k; PRGD, the slope of
log10 gap against k (decades per step).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from robustmargin.theory.fit import slope
from robustmargin.theory.flow import integrate, mlp
from robustmargin.theory.linear import direction_metrics
from robustmargin.theory.svm import max_margin_direction

FLOOR = 1e-12  # gaps below this are float64 noise relative to margins of order 0.1


def run_methods(x, y, *, quick: bool, lr: float = 0.1, period: int = 100, factor: float = 2.0,
                steps: int | None = None) -> pd.DataFrame:
    w_star = max_margin_direction(x.numpy(), y.numpy())
    steps = steps or (2000 if quick else 6000)
    runs = []
    for method in ("GD", "normalized GD", "PRGD"):
        model = mlp(x.shape[1], (), seed=0)
        rescale = (lambda k: factor if k % period == 0 else 1.0) if method == "PRGD" else None
        trace = integrate(model, x, y, loss="exp", steps=steps, mode="gd" if method == "GD" else "normalized",
                          lr=lr, every=10, rescale=rescale, on_record=direction_metrics(w_star, x, y))
        runs.append(trace.assign(method=method))
    return pd.concat(runs, ignore_index=True)


def faster_rows(traces: pd.DataFrame) -> list[dict]:
    rows, finals = [], {}
    for method, unit, transform in (("GD", "d log gap / d log log k", lambda k: np.log(np.log(k))),
                                    ("normalized GD", "d log gap / d log k", np.log),
                                    ("PRGD", "d log10 gap / d k", lambda k: k)):
        t = traces[(traces["method"] == method) & (traces["step"] >= 20)]
        gap = t["margin_gap"].to_numpy()
        finals[method] = float(gap[-1])
        fit_rows = t[(t["step"] >= t["step"].iloc[-1] / 2) | (method == "PRGD")]
        fit_rows = fit_rows[fit_rows["margin_gap"] > FLOOR]
        log_gap = np.log10(fit_rows["margin_gap"]) if method == "PRGD" else np.log(fit_rows["margin_gap"])
        est, lo, hi = slope(transform(fit_rows["step"].to_numpy(float)), log_gap)
        check = f"faster margin ({method})"
        rows += [{"check": check, "quantity": "margin gap to the SVM at the end", "value": finals[method],
                  "target": "", "passed": None},
                 {"check": check, "quantity": unit, "value": est, "target": "", "passed": None},
                 {"check": check, "quantity": unit + " (95% CI low)", "value": lo, "target": "", "passed": None},
                 {"check": check, "quantity": unit + " (95% CI high)", "value": hi, "target": "", "passed": None}]
    rows.append({"check": "faster margin", "quantity": "final gap GD / PRGD", "value": finals["GD"] / max(finals["PRGD"], FLOOR),
                 "target": "PRGD < normalized GD < GD", "passed": bool(finals["PRGD"] < finals["normalized GD"] < finals["GD"])})
    return rows
