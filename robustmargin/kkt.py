"""How close a checkpoint is to a KKT point of the max-margin problem (SCIENCE.md §5)

    (P): minimize ½||θ||² subject to q_n(θ) ≥ 1 for all n,

and the cheap per-epoch companion β = cos ∠(θ, −∇_θ S). Everything is computed in float64.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn
from torch.func import functional_call, grad, vmap

from robustmargin.errors import UserError
from robustmargin.losses import check_loss, log_sum, sample_log_losses
from robustmargin.margins import sample_margins
from robustmargin.models import HomogeneousNet

Params = dict[str, torch.Tensor]


def _squeeze(out: torch.Tensor) -> torch.Tensor:
    """A single-output model's (N, 1) logits become (N,) (labels ±1, q = y·f)."""
    return out[:, 0] if out.shape[1] == 1 else out


def _margin_fn(model: nn.Module) -> Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor]:
    """q(θ; x, y) for a batch, with θ passed explicitly (so torch.func can differentiate it)."""
    return lambda params, x, y: sample_margins(_squeeze(functional_call(model, params, (x,))), y)


def float64_params(model: nn.Module) -> Params:
    """A detached float64 copy of all parameters, by name (the order used to flatten θ)."""
    return {name: p.detach().to(torch.float64, copy=True) for name, p in model.named_parameters()}


def _flat(params: Params) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def margins_at(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, *,
               batch_size: int = 1000) -> torch.Tensor:
    """q_n(θ) for the parameters `params` (float64)."""
    q = _margin_fn(model)
    with torch.no_grad():
        return torch.cat([q(params, xb.double(), yb) for xb, yb in zip(x.split(batch_size), y.split(batch_size))])


def per_sample_margin_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: Params | None = None,
                                *, chunk_size: int = 16) -> torch.Tensor:
    """H with H[n] = ∇_θ q_n(θ), flattened in named_parameters order: (N, P) float64, via vmap(grad).

    Memory is N·P·8 bytes (100 samples of the paper's MNIST CNN: about 2.6 GB)."""
    params = float64_params(model) if params is None else params
    q = _margin_fn(model)
    per_sample = vmap(grad(lambda p, xi, yi: q(p, xi[None], yi[None])[0]), in_dims=(None, 0, 0))
    h = torch.empty(len(x), sum(p.numel() for p in params.values()), dtype=torch.float64, device=x.device)
    for start in range(0, len(x), chunk_size):  # fill H chunk by chunk: peak memory is H plus one chunk
        g = per_sample(params, x[start:start + chunk_size].double(), y[start:start + chunk_size])
        h[start:start + chunk_size] = torch.cat([g[name].flatten(1) for name in params], 1)
    return h


def _nnls_gram(gram: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin_{λ≥0} ||θ − Hᵀλ|| from G = HHᵀ and b = Hθ only (K×K instead of P×K).

    With G = MᵀM (M = √s Vᵀ, numerically null directions dropped) and t = s^{-1/2} Vᵀ b, ||Mλ − t||² equals
    ||θ − Hᵀλ||² up to a constant, so plain NNLS on (M, t) gives the same λ."""
    s, v = np.linalg.eigh(gram)
    keep = s > max(s.max(), 0.0) * len(s) * np.finfo(np.float64).eps
    if not keep.any():
        return np.zeros(len(b))
    root = np.sqrt(s[keep])
    lam, _ = nnls(root[:, None] * v[:, keep].T, (v[:, keep].T @ b) / root, maxiter=50 * len(b))
    return lam


def kkt_residuals(model: HomogeneousNet, x: torch.Tensor, y: torch.Tensor, *, k: int = 100,
                  chunk_size: int = 16) -> dict[str, float | int | np.ndarray]:
    """(ε, δ) KKT residuals of (P) at the checkpoint's direction.

    θ̂ = θ / q_min^{1/L} so that min_n q_n(θ̂) = 1; h_n = ∇_θ q_n(θ̂) for the k samples of smallest margin;
    λ = argmin_{λ≥0} ||θ̂ − Σλ_n h_n|| (NNLS); ε = ||θ̂ − Σλ_n h_n|| / ||θ̂||, δ = Σλ_n (q_n(θ̂) − 1).
    Both are 0 at a KKT point and invariant to rescaling θ. L = model.order: for multi-homogeneous models
    (squared ReLU) L is the sum of the group orders, the exact degree under scaling every group by the same
    factor, so min q_n(θ̂) = 1 still holds exactly. When the h_n are linearly dependent (more samples than
    parameters, e.g. a linear model in low dimension) λ is not unique and NNLS may report δ > 0 at a true
    KKT point; deep networks have P ≫ k, where this does not arise.
    Returns eps, delta, k_used, q_min (of θ itself) and lambda (numpy, over the k_used samples by increasing margin).
    """
    if not model.is_homogeneous:
        raise UserError("KKT residuals need a homogeneous model (no bias after the first layer)")
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    params = float64_params(model)
    q = margins_at(model, params, x, y)
    q_min = float(q.min())
    if not q_min > 0:
        raise UserError(f"KKT residuals need every point classified correctly (q_min = {q_min:.3g})")
    scale = q_min ** (-1.0 / model.order)
    hat = {name: p * scale for name, p in params.items()}
    q_hat = margins_at(model, hat, x, y)
    idx = q_hat.argsort()[:k]
    h = per_sample_margin_gradients(model, x[idx], y[idx], hat, chunk_size=chunk_size)
    theta = _flat(hat)
    lam = torch.from_numpy(_nnls_gram((h @ h.T).cpu().numpy(), (h @ theta).cpu().numpy())).to(h)
    eps = float((theta - h.T @ lam).norm() / theta.norm())  # the residual itself, not via G: no cancellation
    delta = float((lam * (q_hat[idx] - 1)).sum())
    return {"eps": eps, "delta": delta, "k_used": len(idx), "q_min": q_min, "lambda": lam.cpu().numpy()}


def gradient_alignment(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce", *,
                       batch_size: int = 1000, dtype: torch.dtype = torch.float64) -> float:
    """β = cos ∠(θ, −∇_θ S), S the summed training loss over (x, y).

    Uses ∇ log S = ∇S / S (same direction, never underflows), accumulated over batches in log space:
    ∇ log S = Σ_b (S_b / S) ∇ log S_b. The network runs in `dtype` (float32 for a cheap per-epoch value;
    the losses are float64 either way)."""
    check_loss(loss)
    net = copy.deepcopy(model).to(dtype)
    params = [p.requires_grad_(True) for p in net.parameters()]
    device = params[0].device
    log_s, g = -math.inf, torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=device)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        xb, yb = xb.to(device=device, dtype=dtype), yb.to(device)
        log_sb = log_sum(sample_log_losses(_squeeze(net(xb)), yb, loss))
        g_b = torch.cat([t.reshape(-1) for t in torch.autograd.grad(log_sb, params)])
        lb = float(log_sb.detach())
        new = float(np.logaddexp(log_s, lb))
        g = g * math.exp(log_s - new) + g_b * math.exp(lb - new)
        log_s = new
    theta = torch.cat([p.detach().reshape(-1) for p in params]).double()
    return float(-(theta @ g) / (theta.norm() * g.norm()))
