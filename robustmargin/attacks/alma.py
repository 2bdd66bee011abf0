"""Augmented Lagrangian Method for Adversarial attacks (ALMA), L2, untargeted.

Reference: J. Rony, E. Granger, M. Pedersoli, I. Ben Ayed, "Augmented Lagrangian Adversarial
Attacks", ICCV 2021. ALMA minimizes ||δ|| subject to the constraint g(x + δ) ≤ 0, with g the
difference of logits ratio (f_y - max_{j≠y} f_j + τ_logit) / (f_π1 - f_π3) (see apgd.py), by
gradient steps on the augmented Lagrangian ||δ|| + P2(g, ρ, μ) with the penalty-Lagrangian
function P2 of Birgin, Castillo & Martínez (2005):

    P2(g) = μ g + μ ρ g² + ρ² g³ / 6   (g ≥ 0),      μ g / (1 - ρ g)   (g < 0).

Facts of the paper kept here: the first step descends the penalty alone; the multiplier μ
follows an exponential moving average (weight α) of ∂P2/∂g, clipped to [1e-6, 1e12];
every M = 10 steps ρ grows by γ = 1.2 on samples neither adversarial yet nor with a constraint
improved by the factor τ = 0.95; steps are RMSProp with momentum (both α, square average
started at 1), learning rate decaying exponentially to lr × 0.01 over the steps that
follow a sample's first adversarial; iterates are clipped to the box. The smallest adversarial
seen (the package's criterion) is kept. `restarts` and `seed` work as in DDN (see ddn.py).

Settings. The defaults (1000 steps, α = 0.9, lr = 0.1) are those of the authors' implementation
(adv_lib). Their MNIST L2 script also sizes the first step instead of fixing lr
(`init_lr_distance` = 0.1): each sample's lr is found by a line search so that a plain gradient
step from the start, x + δ − lr·∇, clipped to the box, lies at L2 distance 0.1 from x + δ
(a zero gradient is replaced by a random unit direction; where the box keeps every such step
shorter, `lr` stays); that lr then holds for every step.
Its 100-step runs add α = 0.5; the fast budget (runner.FAST_SETTINGS) is that 100-step setting.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustmargin.attacks.apgd import dlr_margin
from robustmargin.attacks.criterion import is_adversarial
from robustmargin.attacks.cw import batch_view
from robustmargin.attacks.ddn import with_restarts
from robustmargin.errors import UserError


def penalty_p2(g: Tensor, rho: Tensor, mu: Tensor) -> Tensor:
    """The penalty-Lagrangian function P2(g, ρ, μ) (module note)."""
    above = mu * g + mu * rho * g.square() + rho.square() * g.pow(3) / 6
    below = mu * g / (1 - rho * g.clamp(max=0))
    return torch.where(g >= 0, above, below)


def penalty_p2_slope(g: Tensor, rho: Tensor, mu: Tensor) -> Tensor:
    """∂P2/∂g: the multiplier estimate the EMA of μ follows."""
    above = mu + 2 * mu * rho * g + rho.square() * g.square() / 2
    below = mu / (1 - rho * g.clamp(max=0)).square()
    return torch.where(g >= 0, above, below)


def alma(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    steps: int = 1000,
    lr: float = 0.1,
    lr_reduction: float = 0.01,
    mu_init: float = 1.0,
    rho_init: float = 1.0,
    check_steps: int = 10,
    tau: float = 0.95,
    gamma: float = 1.2,
    alpha: float = 0.9,
    logit_tolerance: float = 1e-4,
    init_lr_distance: float | None = None,
    restarts: int = 1,
    seed: int = 0,
    start: Tensor | None = None,
) -> Tensor:
    """Untargeted ALMA-L2; returns adversarials (the original input where none was found).

    With `init_lr_distance`, `lr` is found per sample from the first step's size (module note). `start`
    (points shaped like `inputs`) is where the first run begins instead of the inputs."""
    if steps < 1 or check_steps < 1:
        raise UserError("steps and check_steps must be at least 1")
    if not (lr > 0 and 0 < lr_reduction <= 1 and 0 <= alpha < 1):
        raise UserError("ALMA needs lr > 0, 0 < lr_reduction <= 1 and 0 <= alpha < 1")
    if init_lr_distance is not None and not init_lr_distance > 0:
        raise UserError("ALMA's init_lr_distance must be positive")
    x = inputs.detach()
    y = labels.detach().to(x.device)
    options = dict(steps=steps, lr=lr, lr_reduction=lr_reduction, mu_init=mu_init, rho_init=rho_init,
                   check_steps=check_steps, tau=tau, gamma=gamma, alpha=alpha, logit_tolerance=logit_tolerance,
                   init_lr_distance=init_lr_distance)

    def run(delta: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return _alma_run(model, x, y, delta, generator=generator, **options)

    return with_restarts(run, x, restarts=restarts, seed=seed, start=start)


def first_step_lr(start: Tensor, grad: Tensor, distance: float, fallback: float, *, doublings: int = 40,
                  bisections: int = 20) -> Tensor:
    """Per sample, the lr with ||clip(start − lr·grad, 0, 1) − start|| = distance. The length grows with lr
    and clipping only shortens it, so lr ≥ distance / ||grad||: doubling from there until it is passed,
    then bisection. Where the box keeps every step shorter than `distance`, `fallback`."""
    def length(lr: Tensor) -> Tensor:
        return ((start - batch_view(lr, start) * grad).clamp(0, 1) - start).flatten(1).norm(dim=1)

    low = distance / grad.flatten(1).norm(dim=1).clamp_min(1e-30)
    high = 2 * low
    for _ in range(doublings):
        short = length(high) <= distance
        if not bool(short.any()):
            break
        low, high = torch.where(short, high, low), torch.where(short, 2 * high, high)
    reached = length(high) > distance
    for _ in range(bisections):
        mid = (low + high) / 2
        long = length(mid) > distance
        low, high = torch.where(long, low, mid), torch.where(long, mid, high)
    return torch.where(reached, (low + high) / 2, torch.full_like(low, fallback))


def _alma_run(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, *, generator: torch.Generator, steps: int,
              lr: float, lr_reduction: float, mu_init: float, rho_init: float, check_steps: int, tau: float,
              gamma: float, alpha: float, logit_tolerance: float,
              init_lr_distance: float | None) -> tuple[Tensor, Tensor]:
    """One ALMA run from the perturbation `delta`; returns (best norms, best points), inf/x where none."""
    n = x.shape[0]
    mu = torch.full((n,), mu_init, dtype=x.dtype, device=x.device)
    rho = torch.full((n,), rho_init, dtype=x.dtype, device=x.device)
    square_avg = torch.ones_like(x)
    velocity = torch.zeros_like(x)
    best_norm = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    best_adv = x.clone()
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    first_found = torch.full((n,), float(steps), dtype=x.dtype, device=x.device)
    previous_g = torch.zeros(n, dtype=x.dtype, device=x.device)

    for i in range(steps):
        delta = delta.detach().requires_grad_(True)
        logits = model(x + delta)
        g = dlr_margin(logits, y, tolerance=logit_tolerance)
        # the norm's gradient δ/||δ|| is undefined at 0; the floor only matters there
        norm = delta.flatten(1).square().sum(1).clamp_min(1e-24).sqrt()

        with torch.no_grad():
            g_now = g.detach()
            if i == 0:
                previous_g = g_now
            elif (i + 1) % check_steps == 0:
                improved = g_now < tau * previous_g
                rho = torch.where(found | improved, rho, gamma * rho)
                previous_g = g_now
            if i > 0:
                mu = (alpha * mu + (1 - alpha) * penalty_p2_slope(g_now, rho, mu)).clamp(1e-6, 1e12)
            adv = is_adversarial(logits, y)
            plain_norm = delta.detach().flatten(1).norm(dim=1)
            better = adv & (plain_norm < best_norm)
            best_norm = torch.where(better, plain_norm, best_norm)
            best_adv = torch.where(batch_view(better, x), (x + delta).detach(), best_adv)
            first_found = torch.where(adv & ~found, float(i), first_found)
            found |= adv

        objective = penalty_p2(g, rho, mu) if i == 0 else norm + penalty_p2(g, rho, mu)
        (grad,) = torch.autograd.grad(objective.sum(), delta)

        with torch.no_grad():
            if i == 0 and init_lr_distance is not None:
                flat = grad.flatten(1).norm(dim=1) <= 1e-6
                if bool(flat.any()):  # no direction to size the step on: a random one
                    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                    noise = noise / batch_view(noise.flatten(1).norm(dim=1), x)
                    grad = torch.where(batch_view(flat, x), noise, grad)
                base_lr = first_step_lr(x + delta.detach(), grad, init_lr_distance, lr)
            elif i == 0:
                base_lr = torch.full((n,), lr, dtype=x.dtype, device=x.device)
            since = (i - first_found).clamp_min(0) / (steps - first_found).clamp_min(1)
            step_lr = base_lr * lr_reduction ** since
            square_avg = alpha * square_avg + (1 - alpha) * grad.square()
            velocity = alpha * velocity + grad / (square_avg.sqrt() + 1e-8)
            delta = (x + delta - batch_view(step_lr, x) * velocity).clamp(0, 1) - x

    return best_norm, best_adv
