"""A check for gradient masking: does a decision-based attack beat the gradient attacks?

Gradient attacks follow the model's input gradient; where it is masked (zero, noisy or misleading:
quantized inputs, saturated outputs, a non-differentiable step) they stop far from the boundary or
fail. HopSkipJump (foolbox-hsj) uses only the predicted class, so a point where it finds a clearly
smaller distance than the gradient attacks did is one where their distance is not to be trusted.
HopSkipJump itself usually ends above the minimal distance (about 5-15 % at its fast settings on a
linear model, tests/test_masking.py), so the check can miss mild masking but not invent it: every
distance it reports is that of a verified adversarial.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robustmargin.attacks.runner import budget_options, run_attack
from robustmargin.errors import UserError

MASKING_MARGIN = 0.05


@dataclass
class MaskingCheck:
    """Per point: the gradient attacks' distance, foolbox-hsj's; `suspect` indexes the masked-looking points."""

    gradient: Tensor  # float64 (N,)
    decision: Tensor  # float64 (N,): foolbox-hsj's distance (inf where it failed)
    suspect: Tensor  # long: indices where decision < (1 − margin) · gradient


def masking_check(model: nn.Module, x: Tensor, y: Tensor, gradient_distances: Tensor, *,
                  margin: float = MASKING_MARGIN, budget: str = "fast", batch_size: int = 128,
                  device: str | torch.device | None = None, **options: Any) -> MaskingCheck:
    """Run foolbox-hsj on (x, y) and flag the points where it finds a distance more than `margin` (5 %)
    below `gradient_distances` (the gradient attacks' best per point; inf where they failed, which any
    finite distance beats). `options` override the budget's foolbox-hsj settings."""
    gradient = torch.as_tensor(gradient_distances, dtype=torch.float64).cpu()
    if gradient.shape != (len(x),):
        raise UserError(f"expected {len(x)} gradient distances, got shape {tuple(gradient.shape)}")
    if not 0 <= margin < 1:
        raise UserError(f"the masking margin must be in [0, 1), got {margin}")
    settings = {**budget_options("foolbox-hsj", budget), **options}
    decision = run_attack(model, x, y, "foolbox-hsj", batch_size=batch_size, device=device, **settings).distances
    suspect = torch.nonzero(decision < (1 - margin) * gradient).flatten()
    return MaskingCheck(gradient=gradient, decision=decision, suspect=suspect)
