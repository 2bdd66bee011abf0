"""The hard-margin SVM through the origin, min ½||w||² s.t. y_n w·x_n ≥ 1: the limit direction of
gradient descent on a linear model (Soudry et al. 2018; SCIENCE.md §5 with L = 1)."""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from robustmargin.errors import UserError


def max_margin_direction(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """w* of the hard-margin SVM (not normalized: min_n y_n w*·x_n = 1), to float64 precision.

    SLSQP solves the primal; the support vectors it finds (tight constraints) then fix w* exactly as the
    minimum-norm solution of y_s w·x_s = 1 restricted to their span, w = Σ α_s y_s x_s."""
    z = y[:, None] * x
    start = np.linalg.lstsq(z, np.ones(len(y)), rcond=None)[0]
    res = minimize(lambda w: 0.5 * w @ w, start, jac=lambda w: w, method="SLSQP",
                   constraints=[{"type": "ineq", "fun": lambda w: z @ w - 1, "jac": lambda w: z}],
                   options={"maxiter": 1000, "ftol": 1e-15})
    w = res.x
    if not (z @ w).min() > 1 - 1e-6:
        raise UserError("the data are not linearly separable through the origin")
    support = np.flatnonzero(z @ w < 1 + 1e-6)
    zs = z[support]
    alpha = np.linalg.lstsq(zs @ zs.T, np.ones(len(support)), rcond=None)[0]
    polished = zs.T @ alpha
    if (alpha >= -1e-9).all() and (z @ polished).min() > 1 - 1e-12:
        w = polished
    return w
