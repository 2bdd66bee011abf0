"""Fast Minimum-Norm (FMN) L2 attack, untargeted.

Reference: M. Pintor, F. Roli, W. Brendel, B. Biggio, "Fast Minimum-norm Adversarial
Attacks through Adaptive Norm Constraints", NeurIPS 2021 (Algorithm 1, p = 2).
Each step descends the logit difference L = f_y - max_{j≠y} f_j by a normalized
gradient step of size α, then projects onto the L2 ball of radius ε and clips to
the box. ε follows the adaptive rule of the paper: while no adversarial has been
found it is set to the linear estimate of the boundary distance ||δ|| + |L| / ||∇L||
(times 1 + `overshoot`);
afterwards it shrinks by (1-γ) (never above the best norm found) on adversarial
points and grows by (1+γ) otherwise. α and γ are cosine-annealed; the smallest
adversarial perturbation seen is kept. Two additions of ours, both for points on the
box edge or near-linear models (MNIST backgrounds are exactly 0): the gradient is
restricted to directions that stay in the box, and the pre-success boundary estimate
carries a small overshoot. `restarts`, `seed` and `start` work as in DDN (see ddn.py): further
runs start at random points on the sphere through the best point found so far, and a zero
gradient is handled on the device as there.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustmargin.attacks.criterion import is_adversarial
from robustmargin.attacks.cw import batch_view, label_and_best_other
from robustmargin.attacks.ddn import DeadGradientNoise, normalized, with_restarts
from robustmargin.errors import UserError


def _cosine(start: float, end: float, i: int, steps: int) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * i / steps)) / 2


def fmn(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    steps: int = 100,
    max_lr: float = 1.0,
    min_lr: float | None = None,
    gamma: float = 0.05,
    min_gamma: float = 0.001,
    overshoot: float = 0.02,
    restarts: int = 1,
    seed: int = 0,
    start: Tensor | None = None,
) -> Tensor:
    """Untargeted FMN-L2; returns adversarials (the original input where none was found).

    `min_lr` defaults to `max_lr / 100`, the paper's L2 setting. `overshoot` (not in the
    paper; DeepFool's remedy) enlarges the linear boundary estimate used before the first
    success: without it, on a locally linear model the projection lands exactly on the
    boundary, where rounding decides whether the point ever counts as adversarial.
    `start` (points shaped like `inputs`) is where the first run begins instead of the inputs.
    """
    if steps < 1:
        raise UserError("steps must be at least 1")
    x = inputs.detach()
    y = labels.detach().to(x.device)
    options = dict(steps=steps, max_lr=max_lr, final_lr=max_lr / 100 if min_lr is None else min_lr,
                   gamma=gamma, min_gamma=min_gamma, overshoot=overshoot)

    noise = DeadGradientNoise(x, seed)

    def run(delta: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return _fmn_run(model, x, y, delta, noise=noise, **options)

    return with_restarts(run, x, restarts=restarts, seed=seed, start=start)


def _fmn_run(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, *, noise: DeadGradientNoise, steps: int,
             max_lr: float, final_lr: float, gamma: float, min_gamma: float,
             overshoot: float) -> tuple[Tensor, Tensor]:
    """One FMN run from the perturbation `delta`; returns (best norms, best points), inf/x where none."""
    n = x.shape[0]
    worst = torch.maximum(x, 1 - x).flatten(1).norm(dim=1)
    eps = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    best_norm = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    best_adv = x.clone()
    found = torch.zeros(n, dtype=torch.bool, device=x.device)

    for i in range(steps):
        alpha = _cosine(max_lr, final_lr, i, steps)
        gamma_i = _cosine(gamma, min_gamma, i, steps)
        x_adv = (x + delta).requires_grad_(True)
        logits = model(x_adv)
        true, other = label_and_best_other(logits, y)
        diff = true - other
        (grad,) = torch.autograd.grad(diff.sum(), x_adv)

        with torch.no_grad():
            adv = is_adversarial(logits, y)
            norm = delta.flatten(1).norm(dim=1)
            better = adv & (norm < best_norm)
            best_norm = torch.where(better, norm, best_norm)
            best_adv = torch.where(batch_view(better, x), x_adv.detach(), best_adv)
            found |= adv

            # Only directions that stay in the box count: at a pixel on the box edge a descent
            # component pointing outward would be clipped away, and leaving it in makes the
            # boundary estimate too short, so the iterate can stall short of the boundary.
            point = x_adv.detach()
            grad = torch.where(((point <= 0) & (grad > 0)) | ((point >= 1) & (grad < 0)), 0.0, grad)
            grad_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            boundary_estimate = norm + (1 + overshoot) * diff.abs() / grad_norm
            eps = torch.where(
                adv,
                torch.minimum(eps * (1 - gamma_i), best_norm),
                torch.where(found, eps * (1 + gamma_i), boundary_estimate),
            )
            eps = torch.minimum(eps, worst)

            delta = delta - alpha * normalized(grad, noise())
            scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1)
            delta = (x + delta * batch_view(scale, x)).clamp(0, 1) - x

    return best_norm, best_adv
