"""Full-batch float64 gradient flow on the SUMMED loss S = Σ_n ℓ_n, the setting of Theorems 4.1–4.4.

Flows that reach losses like 1e-400 cannot use a fixed time step: the gradient shrinks with S. Every
integrator here takes Euler steps of the flow dθ/dt = −∇S, written as θ ← θ − h ∇log S with a
*time* step dt = h / S (∇log S = ∇S / S), so the path is the gradient-flow path and t is tracked in log
space. The step h moves θ by a fraction κ / max(1, log(1/S)) of its norm,
h = κ ||θ|| / (||∇log S|| max(1, log 1/S)) (`mode="flow"`). Why: the curvature of log S along the
flow grows like ρ^L ≈ log(1/S)/γ̃ times the squared step scale, so this h keeps h × curvature ≈ κ at
every loss — the Euler path stays on the flow's path for small κ, from the start to losses like 1e-400,
while log(1/S) still grows by a constant amount per step. Two other modes serve the
comparisons of schedules: `"gd"` (constant learning rate η on S, dt = η) and `"normalized"`
(θ ← θ − η ∇log S, normalized GD).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from robustmargin import losses, margins
from robustmargin.kkt import _squeeze
from robustmargin.models import HomogeneousNet, ModelSpec, build_model

MODES = ("flow", "gd", "normalized")


def mlp(dim: int, hidden: tuple[int, ...], *, bias: str = "none", activation: str = "relu",
        seed: int = 0) -> HomogeneousNet:
    """A float64 MLP with scalar output (labels ±1); no hidden layer is the linear model w·x (L = 1)."""
    torch.manual_seed(seed)
    spec = ModelSpec(name="mlp", bias=bias, activation=activation, hidden=hidden, in_channels=dim, image_size=1, num_classes=1)
    return build_model(spec).double()


def separable_data(n: int, dim: int, *, gap: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian points labelled by a random direction through the origin, with those within `gap` of
    the plane dropped: separable by a homogeneous linear classifier (and hence by a ReLU network)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(dim, generator=g, dtype=torch.float64)
    teacher /= teacher.norm()
    x = torch.empty(0, dim, dtype=torch.float64)
    while len(x) < n:
        cand = torch.randn(4 * n, dim, generator=g, dtype=torch.float64)
        x = torch.cat([x, cand[(cand @ teacher).abs() > gap]])
    x = x[:n]
    return x, torch.sign(x @ teacher)


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def log_loss_and_margins(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str):
    """(log S, q_n) for the summed loss, in float64."""
    out = _squeeze(model(x))
    return losses.log_sum(losses.sample_log_losses(out, y, loss)), margins.sample_margins(out, y)


def snapshot(model: HomogeneousNet, x: torch.Tensor, y: torch.Tensor, loss: str) -> dict:
    """log S, ρ, q_min, γ̄ = q_min/ρ^L and γ̃ (SCIENCE.md §2, §4) of the current parameters."""
    with torch.no_grad():
        log_s, q = log_loss_and_margins(model, x, y, loss)
    rho = float(flat_params(model).norm())
    scale = rho ** model.order
    return {"log_loss": float(log_s), "rho": rho, "q_min": float(q.min()),
            "normalized_margin": float(q.min()) / scale,
            "smoothed_margin": margins.smoothed_normalized_margin(float(log_s), loss, scale)}


def integrate(model: HomogeneousNet, x: torch.Tensor, y: torch.Tensor, *, loss: str = "logistic",
              steps: int, mode: str = "flow", kappa: float = 1e-3, lr: float = 1e-2, batch: int | None = None,
              every: int = 1, seed: int = 0, stop_log_loss: float = -math.inf,
              rescale: Callable[[int], float] | None = None,
              on_record: Callable[[int, HomogeneousNet], dict] | None = None) -> pd.DataFrame:
    """Run `steps` steps in place on `model` (float64) and return one row per `every` steps.

    Columns: step, log_t (log of the flow time, `flow` and `gd` modes), log_loss (log S, natural log),
    rho, q_min, normalized_margin, smoothed_margin, plus whatever `on_record(step, model)` returns.
    `batch` turns full-batch steps into SGD steps on random batches (the loss and margins recorded stay
    full-batch). `rescale(step)` returns a factor by which θ is multiplied before that step (progressive
    rescaling); 1 leaves it alone."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    log_t, rows = -math.inf, []

    def record(step: int) -> None:
        row = {"step": step, "log_t": log_t, **snapshot(model, x, y, loss)}
        if on_record is not None:
            row.update(on_record(step, model))
        rows.append(row)

    record(0)
    for step in range(1, steps + 1):
        if rescale is not None and (factor := rescale(step)) != 1.0:
            with torch.no_grad():
                torch._foreach_mul_(params, factor)
        idx = torch.randperm(len(y), generator=gen)[:batch] if batch else slice(None)
        log_s, _ = log_loss_and_margins(model, x[idx], y[idx], loss)
        if float(log_s.detach()) < stop_log_loss:
            break
        objective = torch.exp(log_s) if mode == "gd" else log_s
        grads = torch.autograd.grad(objective, params)
        with torch.no_grad():
            if mode == "flow":
                g_norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
                if g_norm == 0:  # a stationary point (every ReLU dead): the flow stops here
                    break
                h = kappa * float(flat_params(model).norm()) / (g_norm * max(1.0, -float(log_s.detach())))
                dt_log = math.log(h) - float(log_s.detach())  # dt = h / S
            else:
                h = lr
                dt_log = math.log(lr) if mode == "gd" else math.log(lr) - float(log_s.detach())
            torch._foreach_add_(params, grads, alpha=-h)
        log_t = float(np.logaddexp(log_t, dt_log))
        if step % every == 0 or step == steps:
            record(step)
    return pd.DataFrame(rows)
