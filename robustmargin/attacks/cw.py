"""Carlini–Wagner L2 attack (untargeted), faithful to the reference algorithm.

Reference: N. Carlini and D. Wagner, "Towards Evaluating the Robustness of Neural
Networks", IEEE S&P 2017, and their released `l2_attack.py`. Facts kept from the
reference: tanh box parametrization x' = (tanh(w) + 1) / 2 started at the input,
Adam (lr 0.01, betas 0.9/0.999, eps 1e-8) reset at every binary-search round,
objective ||x' - x||² + c · max(0, f_y(x') - max_{j≠y} f_j(x') + κ), per-sample
search over c (×10 until the first success, then bisection), abort-early test every
tenth of the steps, and the smallest successful distance kept over all steps and
rounds.

One deliberate difference: the abort-early test is applied per sample rather than to
the batch-summed objective, so a result never depends on which other points share
its batch; samples that stop are dropped from the batch, which is where most of the
speed comes from.

Success is the package's criterion (`criterion.is_adversarial`: the argmax, with its
first-index tie rule, differs from the label) in the best-point bookkeeping and in the
search over c. The reference's test `max_{j≠y} f_j > f_y + κ` misses ties: where all
logits are equal (a region where every ReLU is off) argmax names class 0, which the
reference never counts. With κ > 0 a point must in addition satisfy
max_{j≠y} f_j - f_y ≥ κ, so κ keeps its meaning of a required logit margin.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustmargin.attacks.criterion import is_adversarial
from robustmargin.errors import UserError

# The reference shrinks [0,1] slightly before arctanh so that 0 and 1 map to finite w.
_TANH_SHRINK = 0.999999
# Bounds at or above this are "not yet found" in the reference's bisection rule.
_UPPER_SENTINEL = 1e9
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


def label_and_best_other(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Return (f_y, max_{j≠y} f_j) per row; the shared quantity of every attack here."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true, others.amax(dim=1)


def succeeded(logits: Tensor, labels: Tensor, true: Tensor, other: Tensor, confidence: float) -> Tensor:
    """The criterion, plus the margin κ = `confidence` when it is positive."""
    adv = is_adversarial(logits, labels)
    return adv & (other - true >= confidence) if confidence > 0 else adv


def flat_sq_norm(t: Tensor) -> Tensor:
    return t.flatten(1).square().sum(dim=1)


def batch_view(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector to broadcast against a batch like `like`."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def carlini_wagner_l2(
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
    """Untargeted CW-L2 with the reference defaults; returns adversarials (inputs where none found)."""
    if steps < 1 or binary_search_steps < 1:
        raise UserError("steps and binary_search_steps must be at least 1")
    x = inputs.detach()
    y = labels.detach().to(x.device)
    n = x.shape[0]
    w0 = torch.atanh((2 * x - 1) * _TANH_SHRINK)

    lower = torch.zeros(n, dtype=torch.float64, device=x.device)
    upper = torch.full((n,), math.inf, dtype=torch.float64, device=x.device)
    const = torch.full((n,), initial_const, dtype=torch.float64, device=x.device)
    best_d2 = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    best_adv = x.clone()
    check_every = math.ceil(steps / 10)

    for round_ in range(binary_search_steps):
        if binary_search_steps >= 10 and round_ == binary_search_steps - 1:
            # reference: with 10+ rounds, the last one retries at the best known const
            const = torch.clamp(upper, max=1e10)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        modifier = torch.zeros_like(x)
        adam_m = torch.zeros_like(x)
        adam_v = torch.zeros_like(x)
        prev_loss = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        active = torch.arange(n, device=x.device)
        const_x = const.to(x.dtype)

        for step in range(steps):
            mod = modifier[active].requires_grad_(True)
            x_adv = (torch.tanh(w0[active] + mod) + 1) / 2
            logits = model(x_adv)
            true, other = label_and_best_other(logits, y[active])
            d2 = flat_sq_norm(x_adv - x[active])
            loss = d2 + const_x[active] * torch.clamp(true - other + confidence, min=0)
            (grad,) = torch.autograd.grad(loss.sum(), mod)

            with torch.no_grad():
                # record the evaluated (pre-update) point, as the reference does
                adv = succeeded(logits, y[active], true, other, confidence)
                better = adv & (d2 < best_d2[active])
                best_d2[active] = torch.where(better, d2, best_d2[active])
                best_adv[active] = torch.where(batch_view(better, x_adv), x_adv, best_adv[active])
                found[active] |= adv

                t = step + 1
                m = _ADAM_BETAS[0] * adam_m[active] + (1 - _ADAM_BETAS[0]) * grad
                v = _ADAM_BETAS[1] * adam_v[active] + (1 - _ADAM_BETAS[1]) * grad.square()
                adam_m[active], adam_v[active] = m, v
                m_hat = m / (1 - _ADAM_BETAS[0] ** t)
                v_hat = v / (1 - _ADAM_BETAS[1] ** t)
                modifier[active] = mod.detach() - lr * m_hat / (v_hat.sqrt() + _ADAM_EPS)

                if abort_early and step % check_every == 0:
                    loss = loss.detach()
                    progressing = loss <= 0.9999 * prev_loss[active]
                    prev_loss[active] = loss
                    active = active[progressing]
                    if active.numel() == 0:
                        break

        upper = torch.where(found, torch.minimum(upper, const), upper)
        lower = torch.where(found, lower, torch.maximum(lower, const))
        const = torch.where(upper < _UPPER_SENTINEL, (lower + upper) / 2, const * 10)

    return best_adv
