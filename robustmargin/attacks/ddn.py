"""Decoupled Direction and Norm (DDN) L2 attack, untargeted.

Reference: J. Rony, L. G. Hafemann, L. S. Oliveira, I. Ben Ayed, R. Sabourin,
E. Granger, "Decoupling Direction and Norm for Efficient Gradient-Based L2
Adversarial Attacks and Defenses", CVPR 2019. Each step: an ascent step of size α
(cosine-annealed from `max_lr` to `min_lr`) along the normalized gradient of the
cross-entropy, then the perturbation is rescaled to norm ε, where ε shrinks by
(1-γ) while the current point is adversarial and grows by (1+γ) otherwise, and
finally clipped to the box. The smallest adversarial perturbation seen is kept.

The ascent direction is computed from z = logsumexp_{j≠y} f_j - f_y instead of the
cross-entropy softplus(z): ∇CE = sigmoid(z)·∇z, so the normalized direction is the
same, but ∇CE underflows to zero in float32 once the loss is below ~1e-8, which is
exactly the regime of the long-trained checkpoints this suite studies.

Restarts (ours): a gradient attack can stop in a local minimum of a ReLU network's
piecewise-linear decision boundary. With `restarts = k`, the first run starts at the
input as above and each further run starts on the sphere through the best point found
so far (radius = that distance; half the box's largest distance while nothing is
found), in an independent uniformly random direction, clipped to the box; ε starts at
the start's norm. The smallest adversarial over all runs is kept per sample. Directions
come from `seed`, so a call is repeatable.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustmargin.attacks.criterion import is_adversarial
from robustmargin.attacks.cw import batch_view, label_and_best_other
from robustmargin.errors import UserError


def normalized(g: Tensor, *, generator: torch.Generator) -> Tensor:
    """Unit-L2 rows; a zero row is replaced by a fixed random direction so the search can move."""
    norms = g.flatten(1).norm(dim=1)
    dead = norms == 0
    if bool(dead.any()):
        noise = torch.randn(g.shape, generator=generator, dtype=g.dtype, device="cpu").to(g.device)
        g = torch.where(batch_view(dead, g), noise, g)
        norms = g.flatten(1).norm(dim=1)
    return g / batch_view(norms.clamp_min(1e-12), g)


def random_start(x: Tensor, radius: Tensor, *, generator: torch.Generator) -> Tensor:
    """A perturbation of norm `radius` (per sample) in a uniformly random direction, clipped to the box."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    return (x + normalized(noise, generator=generator) * batch_view(radius, x)).clamp(0, 1) - x


def with_restarts(run, x: Tensor, *, restarts: int, seed: int) -> Tensor:
    """Best adversarial per sample over `restarts` runs of `run(delta0, generator) -> (norms, points)`:
    the first from delta0 = 0, the others from random starts on the sphere through the best so far."""
    if restarts < 1:
        raise UserError("restarts must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    best_norm, best_adv = run(torch.zeros_like(x), generator)
    fallback = torch.maximum(x, 1 - x).flatten(1).norm(dim=1) / 2
    for _ in range(restarts - 1):
        radius = torch.where(torch.isfinite(best_norm), best_norm, fallback)
        norm, adv = run(random_start(x, radius, generator=generator), generator)
        better = norm < best_norm
        best_norm = torch.where(better, norm, best_norm)
        best_adv = torch.where(batch_view(better, x), adv, best_adv)
    return best_adv


def ddn(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    steps: int = 100,
    init_epsilon: float = 1.0,
    gamma: float = 0.05,
    max_lr: float = 1.0,
    min_lr: float = 0.01,
    restarts: int = 1,
    seed: int = 0,
) -> Tensor:
    """Untargeted DDN-L2; returns adversarials (the original input where none was found)."""
    if steps < 1:
        raise UserError("steps must be at least 1")
    x = inputs.detach()
    y = labels.detach().to(x.device)

    def run(delta: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return _ddn_run(model, x, y, delta, generator=generator, steps=steps, init_epsilon=init_epsilon,
                        gamma=gamma, max_lr=max_lr, min_lr=min_lr)

    return with_restarts(run, x, restarts=restarts, seed=seed)


def _ddn_run(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, *, generator: torch.Generator, steps: int,
             init_epsilon: float, gamma: float, max_lr: float, min_lr: float) -> tuple[Tensor, Tensor]:
    """One DDN run from the perturbation `delta`; returns (best norms, best points), inf/x where none."""
    n = x.shape[0]
    # the largest distance inside the box: a larger ε cannot help
    worst = torch.maximum(x, 1 - x).flatten(1).norm(dim=1)
    start = delta.flatten(1).norm(dim=1)
    eps = torch.where(start > 0, start, torch.full((n,), init_epsilon, dtype=x.dtype, device=x.device))
    best_norm = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    best_adv = x.clone()

    for i in range(steps):
        alpha = min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * i / steps)) / 2
        x_adv = (x + delta).requires_grad_(True)
        logits = model(x_adv)
        true, _ = label_and_best_other(logits, y)
        others = logits.scatter(1, y[:, None], float("-inf"))
        z = torch.logsumexp(others, dim=1) - true
        (grad,) = torch.autograd.grad(z.sum(), x_adv)

        with torch.no_grad():
            adv = is_adversarial(logits, y)
            norm = delta.flatten(1).norm(dim=1)
            better = adv & (norm < best_norm)
            best_norm = torch.where(better, norm, best_norm)
            best_adv = torch.where(batch_view(better, x), x_adv.detach(), best_adv)

            delta = delta + alpha * normalized(grad, generator=generator)
            eps = torch.where(adv, eps * (1 - gamma), eps * (1 + gamma))
            eps = torch.minimum(eps, worst)
            scale = eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = (x + delta * batch_view(scale, x)).clamp(0, 1) - x

    return best_norm, best_adv
