"""The theory suite: each check passes on a case that meets its theorem's premise and fails when the
premise is broken (a step far too large, a model that is not homogeneous, data that are not separable).
The SVM references here are solved from the dual with scipy, independently of robustmargin.theory.svm."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize

from robustmargin.errors import UserError
from robustmargin.theory import faster, homogeneous, linear, run_theory
from robustmargin.theory.flow import separable_data


def dual_svm(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """w* = Σ α_n y_n x_n with α = argmax_{α≥0} Σα − ½||Σ α_n y_n x_n||² (the hard-margin dual, no bias)."""
    z = y[:, None] * x
    res = minimize(lambda a: 0.5 * np.sum((z.T @ a) ** 2) - a.sum(), np.zeros(len(y)),
                   jac=lambda a: z @ (z.T @ a) - 1, bounds=[(0, None)] * len(y), method="L-BFGS-B",
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000})
    return z.T @ res.x


def one_minus_cos(w, v):
    return 1 - float(w @ v) / (np.linalg.norm(w) * np.linalg.norm(v))


def test_linear_flow_reaches_the_svm_direction():
    x, y = linear.linear_data()
    rows, trace, w = linear.run_linear(quick=True, loss="logistic", x=x, y=y, steps=1500)
    reference = dual_svm(x.numpy(), y.numpy())
    assert one_minus_cos(w, reference) <= 1e-3
    row = next(r for r in rows if r["quantity"].startswith("1 - cos"))
    assert row["passed"] and row["value"] == pytest.approx(one_minus_cos(w, reference), rel=1e-3, abs=1e-9)
    assert trace["one_minus_cos"].iloc[-1] < trace["one_minus_cos"].iloc[0] / 100


def test_linear_check_refuses_data_not_separable_through_the_origin():
    x, y = linear.linear_data()
    x, y = x.clone(), y.clone()
    x[1], y[1] = x[0], -y[0]  # the same point with both labels: no w separates them
    with pytest.raises(UserError, match="not linearly separable"):
        linear.run_linear(quick=True, loss="exp", x=x, y=y, steps=10)


def test_smoothed_margin_monotone_under_small_steps_not_under_large_ones():
    good = homogeneous.run_flow(2, quick=True, steps=400)
    sgd = homogeneous.run_sgd(2, quick=True, steps=300)
    assert homogeneous.monotone_rows(good, sgd)[0]["passed"]
    assert homogeneous.decreases(sgd)[0] > 0  # SGD does dip
    bad = homogeneous.run_flow(2, quick=True, steps=400, kappa=1.0)  # steps far too large for a flow
    assert homogeneous.decreases(bad)[0] > 0
    assert not homogeneous.monotone_rows(bad, sgd)[0]["passed"]


def test_rates_match_theory_only_for_the_order_the_network_has():
    flow = homogeneous.run_flow(2, quick=True, steps=1000)
    assert all(r["passed"] for r in homogeneous.rate_rows(flow) if r["passed"] is not None)
    # squared ReLU: two layers, but 3-homogeneous, so the L = 2 rates must not fit
    wrong = homogeneous.run_flow(2, quick=True, steps=1000, activation="relu2")
    assert not all(r["passed"] for r in homogeneous.rate_rows(wrong) if r["passed"] is not None)


def test_kkt_residuals_fall_and_need_a_homogeneous_model():
    flow = homogeneous.run_flow(3, quick=True, steps=1000)
    rows = homogeneous.kkt_rows(flow)
    eps_end = next(r for r in rows if r["quantity"] == "epsilon at the end")
    assert eps_end["passed"]
    biased = homogeneous.run_flow(2, quick=True, steps=200, bias="all")  # a bias in every layer
    assert not any(r["passed"] for r in homogeneous.kkt_rows(biased))


def test_prgd_beats_normalized_gd_beats_gd_and_needs_the_rescaling():
    x, y = linear.linear_data()
    rows = faster.faster_rows(faster.run_methods(x, y, quick=True, steps=600))
    assert rows[-1]["passed"]
    no_rescale = faster.faster_rows(faster.run_methods(x, y, quick=True, steps=600, factor=1.0))
    assert not no_rescale[-1]["passed"]  # PRGD without the rescaling is normalized GD


@pytest.mark.slow
def test_quick_suite_files(tmp_path):
    table = run_theory(tmp_path, quick=True, progress=False)
    saved = pd.read_csv(tmp_path / "theory.csv")
    assert list(saved.columns) == ["check", "quantity", "value", "target", "passed"]
    assert len(saved) == len(table) and table[table["passed"].notna()]["passed"].astype(bool).all()
    data = np.load(tmp_path / "linear.npz")
    assert one_minus_cos(data["w"], dual_svm(data["X"], data["y"])) <= 1e-3
    page = (tmp_path / "theory.html").read_text()
    assert page.count("data:image/png;base64,") == 5


def test_separable_data_is_separable():
    x, y = separable_data(30, 4, seed=3)
    assert one_minus_cos(dual_svm(x.numpy(), y.numpy()), dual_svm(x.numpy(), y.numpy())) < 1e-12
    assert ((y.numpy()[:, None] * x.numpy()) @ dual_svm(x.numpy(), y.numpy()) > 1 - 1e-6).all()
