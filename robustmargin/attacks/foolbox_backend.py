"""Foolbox's CW, DDN and FMN behind this package's attack signature: an independent cross-check.

Foolbox returns a point for every sample whether or not it is adversarial (CW returns
an all-zeros image where it found nothing), so each adapter keeps foolbox's point only
where foolbox itself judges it adversarial and CW really found it, and returns the
original input elsewhere. Known quirk of
foolbox 3.3.4: `L2FMNAttack.project` never shrinks the perturbation (its scale factor
is norms / norms = 1), so foolbox-fmn is much weaker than the paper's FMN.
"""
from __future__ import annotations

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


def _run(model: nn.Module, inputs: Tensor, labels: Tensor, attack: Any, *, zeros_mean_failure: bool = False) -> Tensor:
    fb = _foolbox()
    x = inputs.detach()
    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device=x.device)
    _, points, success = attack(fmodel, x.clone(), labels.detach().to(x.device), epsilons=None)
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


FOOLBOX_ATTACKS: dict[str, Callable[..., Tensor]] = {
    "foolbox-cw": foolbox_cw,
    "foolbox-ddn": foolbox_ddn,
    "foolbox-fmn": foolbox_fmn,
}
