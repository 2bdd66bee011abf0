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
come from `seed`, so a call is repeatable. `start` moves the first run's start from the
input to given points (another attack's best, say).

Where the gradient is exactly zero (a region where the logits are flat), the step takes a
random direction instead; the test is made on the device, so no step waits for a host read.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustmargin.attacks.criterion import is_adversarial
from robustmargin.attacks.cw import batch_view, label_and_best_other
from robustmargin.errors import UserError

# Offset of the seed of the zero-gradient directions' stream (any value apart from small seeds).
_DEAD_STREAM = 0x5EED_0000_0000


def normalized(g: Tensor, noise: Tensor) -> Tensor:
    """Unit-L2 rows; a zero row is replaced by the unit row of `noise` (random) so the search can move.

    The choice is made on the device (no host read), so the steps of a run queue without waiting on a GPU.
    """
    norms = g.flatten(1).norm(dim=1)
    dead = norms == 0
    g = torch.where(batch_view(dead, g), noise, g)
    norms = torch.where(dead, noise.flatten(1).norm(dim=1), norms)
    return g / batch_view(norms.clamp_min(1e-12), g)


class DeadGradientNoise:
    """A fresh random direction per step for rows whose gradient is exactly zero (flat logits).

    Drawn every step on the inputs' device from a stream of its own: nothing waits for a host read
    to decide whether it is needed, and the restarts' random starts do not depend on it.
    """

    def __init__(self, like: Tensor, seed: int) -> None:
        self.like = like
        self.generator = torch.Generator(device=like.device).manual_seed(_DEAD_STREAM + seed)

    def __call__(self) -> Tensor:
        return torch.randn(self.like.shape, generator=self.generator, dtype=self.like.dtype, device=self.like.device)


def random_start(x: Tensor, radius: Tensor, *, generator: torch.Generator) -> Tensor:
    """A perturbation of norm `radius` (per sample) in a uniformly random direction, clipped to the box."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    unit = noise / batch_view(noise.flatten(1).norm(dim=1).clamp_min(1e-12), noise)
    return (x + unit * batch_view(radius, x)).clamp(0, 1) - x


def start_perturbation(x: Tensor, start: Tensor | None) -> Tensor:
    """The first run's perturbation: `start - x` inside the box, 0 without `start`."""
    if start is None:
        return torch.zeros_like(x)
    if start.shape != x.shape:
        raise UserError(f"start must have the inputs' shape {tuple(x.shape)}, got {tuple(start.shape)}")
    return start.detach().to(device=x.device, dtype=x.dtype).clamp(0, 1) - x


def with_restarts(run, x: Tensor, *, restarts: int, seed: int, start: Tensor | None = None) -> Tensor:
    """Best adversarial per sample over `restarts` runs of `run(delta0, generator) -> (norms, points)`:
    the first from delta0 = start - x (0 without `start`), the others from random starts on the sphere
    through the best so far."""
    if restarts < 1:
        raise UserError("restarts must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    best_norm, best_adv = run(start_perturbation(x, start), generator)
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
    start: Tensor | None = None,
) -> Tensor:
    """Untargeted DDN-L2; returns adversarials (the original input where none was found).

    `start` (points shaped like `inputs`) is where the first run begins instead of the inputs.
    """
    if steps < 1:
        raise UserError("steps must be at least 1")
    x = inputs.detach()
    y = labels.detach().to(x.device)
    noise = DeadGradientNoise(x, seed)

    def run(delta: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return _ddn_run(model, x, y, delta, noise=noise, steps=steps, init_epsilon=init_epsilon,
                        gamma=gamma, max_lr=max_lr, min_lr=min_lr)

    return with_restarts(run, x, restarts=restarts, seed=seed, start=start)


def _ddn_run(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, *, noise: DeadGradientNoise, steps: int,
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

            delta = delta + alpha * normalized(grad, noise())
            eps = torch.where(adv, eps * (1 - gamma), eps * (1 + gamma))
            eps = torch.minimum(eps, worst)
            scale = eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = (x + delta * batch_view(scale, x)).clamp(0, 1) - x

    return best_norm, best_adv
