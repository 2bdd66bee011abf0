"""Log-space losses (SCIENCE.md §3, §6): the training loss reaches 1e-800 and below, so it only ever
exists as its logarithm. Logits are cast to float64 before anything else.

Every loss is a function of the exponent z_n = logsumexp_{j≠y}(f_j − f_y) (= −y·f for a scalar
output with labels ±1):
  cross-entropy / logistic: ℓ = log(1 + e^z) = softplus(z),  exponential: ℓ = e^z.
"""
from __future__ import annotations

import math

import torch

from robustmargin.errors import UserError

LOSSES = ("ce", "logistic", "exp")


def check_loss(name: str) -> str:
    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return name


def exponent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_n in float64: logsumexp over wrong classes of f_j − f_y, or −y·f for a scalar output."""
    logits = logits.double()
    if logits.ndim == 1:
        return -labels.double() * logits
    diff = logits - logits.gather(1, labels[:, None])
    return diff.scatter(1, labels[:, None], float("-inf")).logsumexp(1)


def log_softplus(z: torch.Tensor) -> torch.Tensor:
    """log(log(1 + e^z)) without underflow: for z < −30, log softplus(z) = z − e^z/2 + O(e^{2z})."""
    small = z < -30.0
    direct = torch.log(torch.nn.functional.softplus(torch.where(small, torch.zeros_like(z), z)))
    tail = torch.where(small, z, torch.full_like(z, -30.0))  # keeps exp finite in the unused branch
    return torch.where(small, tail - torch.exp(tail) / 2, direct)


def sample_log_losses(logits: torch.Tensor, labels: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """log ℓ_n per sample, float64."""
    z = exponent(logits, labels)
    return z if loss == "exp" else log_softplus(z)


def log_sum(log_values: torch.Tensor) -> torch.Tensor:
    """log Σ exp(log_values), float64."""
    return log_values.double().logsumexp(0)


def log_mean(log_values: torch.Tensor) -> torch.Tensor:
    """log of the mean of exp(log_values)."""
    return log_sum(log_values) - math.log(log_values.numel())


def relative_loss(logits: torch.Tensor, labels: torch.Tensor, log_frame: float, loss: str = "ce") -> torch.Tensor:
    """R = mean_n ℓ_n / F with log F = `log_frame`: a batch loss of order one whose gradient is the true
    gradient divided by F, so θ ← θ − α ∇R is SGD with learning rate α/F on the true mean loss."""
    return torch.exp(log_mean(sample_log_losses(logits, labels, loss)) - log_frame)


def log10(log_value: float) -> float:
    return log_value / math.log(10.0)
