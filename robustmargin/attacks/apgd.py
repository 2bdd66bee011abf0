"""APGD with the DLR loss in L2, made a minimal-norm attack by a per-sample search over ε; untargeted.

Reference: F. Croce, M. Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020. APGD maximizes a loss inside the ball ||δ|| ≤ ε
(intersected with the box) by projected normalized-gradient steps with momentum α = 0.75, step
size η starting at 2ε and halved at the checkpoints w_j = ⌈p_j N⌉ (p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) when the loss rose in fewer than a share ρ = 0.75
of the steps since the last checkpoint, or when η was not halved at the last checkpoint and the
best loss has not improved since; a halving restarts from the best-loss point. The loss is the
difference of logits ratio DLR = -(f_y - max_{j≠y} f_j) / (f_π1 - f_π3), invariant to the
scale of the logits (the long-trained checkpoints here have huge logits).

APGD answers "is there an adversarial within ε"; the minimal distance comes from a search over ε
per sample (ours, as the paper leaves it open): the first ε is the linear estimate of the
boundary distance |f_y - max_{j≠y} f_j| / ||∇(f_y - max_{j≠y} f_j)|| (one gradient), doubled
while APGD finds nothing; once an adversarial is found, ε bisects between the largest ε that
failed and the smallest adversarial distance found so far. Rounds that have an adversarial to
start from begin at it, scaled onto the sphere of radius ε (warm start, ours); the others begin
at a random point of that sphere, as in the paper. Every iterate that is adversarial (the
package's criterion) and nearer than the best so far is kept, so one call costs
`search_steps × steps + 1` gradients per point.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustmargin.attacks.criterion import is_adversarial
from robustmargin.attacks.cw import batch_view, label_and_best_other
from robustmargin.attacks.ddn import DeadGradientNoise, normalized, random_start, with_restarts
from robustmargin.errors import UserError


def dlr_margin(logits: Tensor, labels: Tensor, *, tolerance: float = 0.0) -> Tensor:
    """(f_y - max_{j≠y} f_j + tolerance) / (f_π1 - f_π3): positive while y is predicted.

    With fewer than three classes there is no third logit and the plain difference is returned.
    """
    true, other = label_and_best_other(logits, labels)
    diff = true - other + tolerance
    if logits.shape[1] < 3:
        return diff
    top = logits.topk(3, dim=1).values
    return diff / (top[:, 0] - top[:, 2] + 1e-12)


def checkpoints(steps: int) -> list[int]:
    """The iterations w_j at which APGD may halve its step size (paper, Sec. 3.2)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = (math.ceil(round(q * steps, 6)) for q in p[1:])
    return sorted({m for m in marks if m < steps})


def _project(x: Tensor, delta: Tensor, eps: Tensor) -> Tensor:
    """Into the box, then onto the ε-ball (shrinking towards x keeps a point inside the box)."""
    delta = (x + delta).clamp(0, 1) - x
    scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1)
    return delta * batch_view(scale, x)


def _apgd(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, delta: Tensor, *, steps: int, rho: float,
          momentum: float, best_norm: Tensor, best_adv: Tensor, noise: DeadGradientNoise) -> None:
    """One APGD run at radius ε (per sample) from `delta`; updates best_norm/best_adv in place."""
    marks = set(checkpoints(steps))

    def evaluate(d: Tensor) -> tuple[Tensor, Tensor]:
        point = (x + d).requires_grad_(True)
        logits = model(point)
        loss = -dlr_margin(logits, y)
        (grad,) = torch.autograd.grad(loss.sum(), point)
        with torch.no_grad():
            better = is_adversarial(logits, y) & (d.flatten(1).norm(dim=1) < best_norm)
            best_norm.copy_(torch.where(better, d.flatten(1).norm(dim=1), best_norm))
            best_adv.copy_(torch.where(batch_view(better, x), point.detach(), best_adv))
        return loss.detach(), grad

    eta = 2 * eps
    delta = _project(x, delta, eps)
    loss, grad = evaluate(delta)
    best_loss, best_delta, best_grad = loss.clone(), delta.clone(), grad.clone()
    previous, previous_loss = delta, loss
    increases = torch.zeros_like(loss)
    halved_last = torch.ones_like(loss, dtype=torch.bool)
    best_at_mark = best_loss.clone()
    last_mark = 0
    for k in range(1, steps):
        with torch.no_grad():
            z = _project(x, delta + batch_view(eta, x) * normalized(grad, noise()), eps)
            a = momentum if k > 1 else 1.0
            step = _project(x, delta + a * (z - delta) + (1 - a) * (delta - previous), eps)
            previous = delta
            delta = step
        loss, grad = evaluate(delta)
        with torch.no_grad():
            increases += (loss > previous_loss).to(loss.dtype)
            previous_loss = loss
            up = loss > best_loss
            best_loss = torch.where(up, loss, best_loss)
            best_delta = torch.where(batch_view(up, x), delta, best_delta)
            best_grad = torch.where(batch_view(up, x), grad, best_grad)
            if k in marks:
                few_increases = increases < rho * (k - last_mark)
                stalled = ~halved_last & (best_loss <= best_at_mark)
                halve = few_increases | stalled
                eta = torch.where(halve, eta / 2, eta)
                delta = torch.where(batch_view(halve, x), best_delta, delta)
                grad = torch.where(batch_view(halve, x), best_grad, grad)
                previous = torch.where(batch_view(halve, x), best_delta, previous)
                halved_last, best_at_mark, last_mark = halve, best_loss.clone(), k
                increases.zero_()


def linear_boundary_estimate(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """|f_y - max_{j≠y} f_j| / ||∇(f_y - max_{j≠y} f_j)|| at x: the distance to the linearized boundary."""
    point = x.clone().requires_grad_(True)
    true, other = label_and_best_other(model(point), y)
    diff = true - other
    (grad,) = torch.autograd.grad(diff.sum(), point)
    return (diff.detach().abs() / grad.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp_min(1e-6)


def apgd(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    steps: int = 100,
    search_steps: int = 10,
    init_epsilon: float | None = None,
    rho: float = 0.75,
    momentum: float = 0.75,
    restarts: int = 1,
    seed: int = 0,
    start: Tensor | None = None,
) -> Tensor:
    """Minimal-norm APGD-DLR (L2); returns adversarials (the original input where none was found).

    `steps` is APGD's iteration count per ε (the paper's 100), `search_steps` the number of ε
    tried per sample; `init_epsilon` replaces the linear estimate of the first ε. `restarts`
    and `seed` work as in DDN (see ddn.py): a further run starts its search at a random point
    of the sphere through the best point found so far. `start` (points shaped like `inputs`)
    is where the first run's search begins, at ε = its distance, instead of the linear estimate.
    """
    if steps < 1 or search_steps < 1:
        raise UserError("steps and search_steps must be at least 1")
    if init_epsilon is not None and not init_epsilon > 0:
        raise UserError("init_epsilon must be positive")
    x = inputs.detach()
    y = labels.detach().to(x.device)
    noise = DeadGradientNoise(x, seed)

    def run(delta: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        start = delta.flatten(1).norm(dim=1)
        if init_epsilon is not None:
            eps = torch.full_like(start, init_epsilon)
        else:
            eps = linear_boundary_estimate(model, x, y)
        eps = torch.where(start > 0, start, eps)
        return _search(model, x, y, eps, delta, generator=generator, noise=noise, steps=steps,
                       search_steps=search_steps, rho=rho, momentum=momentum)

    return with_restarts(run, x, restarts=restarts, seed=seed, start=start)


def _search(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, delta: Tensor, *, generator: torch.Generator,
            noise: DeadGradientNoise, steps: int, search_steps: int, rho: float,
            momentum: float) -> tuple[Tensor, Tensor]:
    """The search over ε from a first ε and start; returns (best norms, best points), inf/x where none."""
    worst = torch.maximum(x, 1 - x).flatten(1).norm(dim=1)
    best_norm = torch.full_like(eps, math.inf)
    best_adv = x.clone()
    failed = torch.zeros_like(eps)  # the largest ε at which APGD found nothing
    eps = torch.minimum(eps, worst)
    for r in range(search_steps):
        found = torch.isfinite(best_norm)
        if r > 0:
            start = torch.where(batch_view(found, x), best_adv - x, random_start(x, eps, generator=generator))
            start = start * batch_view(eps / start.flatten(1).norm(dim=1).clamp_min(1e-12), x)
        else:
            start = torch.where(batch_view(delta.flatten(1).norm(dim=1) > 0, x), delta,
                                random_start(x, eps, generator=generator))
        _apgd(model, x, y, eps, start, steps=steps, rho=rho, momentum=momentum, best_norm=best_norm,
              best_adv=best_adv, noise=noise)
        succeeded = best_norm <= eps
        failed = torch.where(succeeded, failed, torch.maximum(failed, eps))
        found = torch.isfinite(best_norm)
        eps = torch.where(found, (failed + best_norm.clamp(max=worst)) / 2, torch.minimum(2 * eps, worst))
    return best_norm, best_adv
