"""Margins of a classifier (SCIENCE.md §2, §4): pure functions of logits, norms and log-losses."""
from __future__ import annotations

import math

import torch


def sample_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """q_n = f_y − max_{j≠y} f_j in float64; for a scalar output (N,) with labels ±1, q_n = y·f."""
    logits = logits.double()
    if logits.ndim == 1:
        return labels.double() * logits
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.amax(1)


def norm_product(norms: list[float], orders: list[int]) -> float:
    """∏ ρ_i^{a_i}; equals ρ^L when all groups are scaled together."""
    return math.exp(sum(a * math.log(r) for r, a in zip(norms, orders)))


def normalized_margin(q_min: float, rho: float, order: int) -> float:
    """γ̄ = q_min / ρ^L."""
    return q_min / rho ** order


def layerwise_normalized_margin(q_min: float, norms: list[float], orders: list[int]) -> float:
    """γ̄' = q_min / ∏ ρ_i^{a_i}."""
    return q_min / norm_product(norms, orders)


def log_neg_log_expm1(log_s: float) -> float:
    """−log(exp(S) − 1) from log S, exact where S is representable and ≈ −log S − S/2 below."""
    if log_s < -30.0:  # expm1(S) = S (1 + S/2 + …): the correction is below float64 resolution of log S
        return -log_s - math.exp(log_s) / 2
    if log_s > math.log(700.0):  # expm1(S) ≈ e^S
        return -math.exp(log_s) if log_s < 709.0 else -math.inf
    return -math.log(math.expm1(math.exp(log_s)))


def smoothed_margin_numerator(log_sum_loss: float, loss: str) -> float:
    """log(1/S) for the exponential loss, −log(exp(S) − 1) for logistic and cross-entropy (S = summed loss)."""
    return -log_sum_loss if loss == "exp" else log_neg_log_expm1(log_sum_loss)


def smoothed_normalized_margin(log_sum_loss: float, loss: str, scale: float) -> float:
    """γ̃ = smoothed margin / scale, with scale = ρ^L (or ∏ ρ_i^{a_i} for the multi-homogeneous form)."""
    return smoothed_margin_numerator(log_sum_loss, loss) / scale


def support_counts(margins: torch.Tensor, decades: int = 7) -> list[int]:
    """#{n : q_n < q_min + log 10^k}, k = 1..decades: how many points sit near the minimum margin."""
    q_min = margins.min()
    return [int((margins < q_min + k * math.log(10.0)).sum()) for k in range(1, decades + 1)]
