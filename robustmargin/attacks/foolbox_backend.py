"""Foolbox's CW, DDN, FMN and HopSkipJump behind this package's attack signature.

CW, DDN and FMN are an independent cross-check of the package's own attacks. HopSkipJump
(foolbox-hsj) is decision-based: it queries only the predicted class, so it runs on models
without useful gradients and is the check for gradient masking (attacks/masking.py).

Foolbox returns a point for every sample whether or not it is adversarial (CW returns
an all-zeros image where it found nothing), so each adapter keeps foolbox's point only
where foolbox itself judges it adversarial and CW really found it, and returns the
original input elsewhere. Known quirk of
foolbox 3.3.4: `L2FMNAttack.project` never shrinks the perturbation (its scale factor
is norms / norms = 1), so foolbox-fmn is much weaker than the paper's FMN.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from robustmargin.errors import UserError


def _foolbox() -> Any:
    try:
        with warnings.catch_warnings():
            # foolbox 3.3.4 imports a deprecated scipy.ndimage path; not ours to fix
            warnings.simplefilter("ignore", DeprecationWarning)
            import foolbox
    except ImportError as err:  # includes eagerpy/torch incompatibilities surfacing at import
        raise UserError(f"the foolbox backend needs foolbox>=3.3 importable beside torch: {err}") from err
    return foolbox


def _run(model: nn.Module, inputs: Tensor, labels: Tensor, attack: Any, *, zeros_mean_failure: bool = False,
         **run_options: Any) -> Tensor:
    fb = _foolbox()
    x = inputs.detach()
    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device=x.device)
    _, points, success = attack(fmodel, x.clone(), labels.detach().to(x.device), epsilons=None, **run_options)
    points = points.detach().to(x.dtype)
    if zeros_mean_failure:
        # foolbox's CW starts its "best" points at all-zeros and returns them when it found
        # nothing; a black image is often misclassified, which would pass as a (huge) success.
        # A real CW iterate (tanh(w)+1)/2 is never exactly 0 everywhere.
        success = success & (points != 0).flatten(1).any(1)
    return torch.where(success.view(-1, *([1] * (x.dim() - 1))), points, x)


def foolbox_cw(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    steps: int = 10000,
    binary_search_steps: int = 9,
    initial_const: float = 1e-3,
    lr: float = 0.01,
    confidence: float = 0.0,
    abort_early: bool = True,
) -> Tensor:
    """foolbox.attacks.L2CarliniWagnerAttack (its abort-early test is on the batch-summed loss)."""
    attack = _foolbox().attacks.L2CarliniWagnerAttack(
        binary_search_steps=binary_search_steps,
        steps=steps,
        stepsize=lr,
        confidence=confidence,
        initial_const=initial_const,
        abort_early=abort_early,
    )
    return _run(model, inputs, labels, attack, zeros_mean_failure=True)


def foolbox_ddn(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    steps: int = 100,
    init_epsilon: float = 1.0,
    gamma: float = 0.05,
) -> Tensor:
    """foolbox.attacks.DDNAttack (cross-entropy gradient: vanishes on very confident models)."""
    attack = _foolbox().attacks.DDNAttack(init_epsilon=init_epsilon, steps=steps, gamma=gamma)
    return _run(model, inputs, labels, attack)


def foolbox_fmn(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    steps: int = 100,
    max_lr: float = 1.0,
    min_lr: float | None = None,
    gamma: float = 0.05,
) -> Tensor:
    """foolbox.attacks.L2FMNAttack (see the module note on its projection)."""
    attack = _foolbox().attacks.L2FMNAttack(
        steps=steps, max_stepsize=max_lr, min_stepsize=min_lr, gamma=gamma
    )
    return _run(model, inputs, labels, attack)


@torch.no_grad()
def _starting_points(model: nn.Module, x: Tensor, y: Tensor, tries: int, generator: torch.Generator,
                     search_steps: int = 12) -> tuple[Tensor, Tensor]:
    """(points, found): an adversarial starting point per sample for HopSkipJump, which only walks along
    the boundary of the class region it starts in. Candidates are the other inputs of the batch and
    `tries` random images (uniform noise, or corners of the box); per class, the nearest candidate of
    that class is blended towards the input by a binary search, and the nearest blend is kept."""
    view = (-1, *[1] * (x.dim() - 1))
    logits = model(x)
    candidates = [(x[j].expand_as(x), logits[j].argmax().expand(len(x))) for j in range(len(x))]
    for i in range(tries):
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        u = u.round() if i % 2 else u  # the box's corners reach further than uniform noise
        candidates.append((u, model(u).argmax(1)))
    best = x.clone()
    best_dist = torch.full((len(x),), math.inf, dtype=torch.float64, device=x.device)
    for cls in range(logits.shape[1]):
        near, near_dist = x.clone(), torch.full_like(best_dist, math.inf)
        for c, c_pred in candidates:
            dist = (c.double() - x.double()).flatten(1).norm(dim=1)
            better = (c_pred == cls) & (cls != y) & (dist < near_dist)
            near = torch.where(better.view(view), c, near)
            near_dist = torch.where(better, dist, near_dist)
        has = torch.isfinite(near_dist)
        if not bool(has.any()):
            continue
        low, high = torch.zeros_like(near_dist), torch.ones_like(near_dist)  # the blend at `high` is adversarial
        for _ in range(search_steps):
            mid = (low + high) / 2
            blend = x + mid.to(x.dtype).view(view) * (near - x)
            wrong = model(blend).argmax(1) != y
            high, low = torch.where(wrong, mid, high), torch.where(wrong, low, mid)
        blend = x + high.to(x.dtype).view(view) * (near - x)
        dist = torch.where(has & (model(blend).argmax(1) != y), high * near_dist, torch.full_like(near_dist, math.inf))
        better = dist < best_dist
        best = torch.where(better.view(view), blend, best)
        best_dist = torch.where(better, dist, best_dist)
    return best, torch.isfinite(best_dist)


def foolbox_hsj(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    steps: int = 64,
    initial_gradient_eval_steps: int = 100,
    max_gradient_eval_steps: int = 10000,
    gamma: float = 1.0,
    start_tries: int = 100,
    seed: int = 0,
) -> Tensor:
    """foolbox.attacks.HopSkipJumpAttack, L2 (Chen, Jordan & Wainwright 2020), decision-based.

    It needs an adversarial starting point per sample: the nearest misclassified one among the other
    inputs and `start_tries` random images; a sample with none is a failure. Its random
    directions come from `seed` (the global RNG is left as it was), so a call is repeatable."""
    if steps < 1 or initial_gradient_eval_steps < 1 or max_gradient_eval_steps < 1 or start_tries < 0:
        raise UserError("HopSkipJump needs steps and gradient evaluation steps of at least 1")
    x, y = inputs.detach(), labels.detach().to(inputs.device)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        starts, found = _starting_points(model, x, y, start_tries, torch.Generator().manual_seed(seed))
        out = x.clone()
        if bool(found.any()):
            attack = _foolbox().attacks.HopSkipJumpAttack(
                steps=steps, initial_gradient_eval_steps=initial_gradient_eval_steps,
                max_gradient_eval_steps=max_gradient_eval_steps, gamma=gamma, constraint="l2")
            out[found] = _run(model, x[found], y[found], attack, starting_points=starts[found])
    return out


FOOLBOX_ATTACKS: dict[str, Callable[..., Tensor]] = {
    "foolbox-cw": foolbox_cw,
    "foolbox-ddn": foolbox_ddn,
    "foolbox-fmn": foolbox_fmn,
    "foolbox-hsj": foolbox_hsj,
}
