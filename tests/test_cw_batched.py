"""Batched CW (state compacted at abort-early checks) against the step-by-step implementation it
replaced, kept here verbatim as the reference: identical points on the CPU, bit for bit."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from robustmargin.attacks import carlini_wagner_l2, run_attack
from robustmargin.attacks.runner import CountingModel
from robustmargin.attacks.cw import (
    _ADAM_BETAS,
    _ADAM_EPS,
    _TANH_SHRINK,
    _UPPER_SENTINEL,
    batch_view,
    flat_sq_norm,
    label_and_best_other,
    succeeded,
)
from test_attacks import small_cnn, tie_region_net


def reference_cw(
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
    """The previous implementation: full-size state gathered and scattered by `active` every step."""
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


CASES = [
    # abort early drops samples at different rounds; one long round with none dropped
    dict(steps=60, binary_search_steps=5, initial_const=0.1, lr=0.05),
    dict(steps=40, binary_search_steps=3, initial_const=1.0, lr=0.1, abort_early=False),
    dict(steps=30, binary_search_steps=11, initial_const=0.01, lr=0.05),  # the 10+ rounds rule
    dict(steps=50, binary_search_steps=3, initial_const=10.0, lr=0.05, confidence=0.02),
]


@pytest.mark.parametrize("options", CASES, ids=["abort-early", "no-abort", "eleven-rounds", "confidence"])
def test_batched_cw_equals_the_reference_implementation(options):
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(24, 1, 12, 12, generator=gen)
    x[:, :, :2] = 0.0
    model = small_cnn()
    with torch.no_grad():
        y = model(x).argmax(1)
    counter = CountingModel(model)
    new = carlini_wagner_l2(counter, x, y, **options)
    old = reference_cw(model, x, y, **options)
    assert torch.equal(new, old)
    assert bool((new != x).flatten(1).any(1).any())
    full = len(x) * options["steps"] * options["binary_search_steps"]
    assert (counter.forwards < full) == options.get("abort_early", True)  # samples were dropped


def test_batched_cw_equals_the_reference_in_the_tie_region():
    net = tie_region_net()
    gen = torch.Generator().manual_seed(5)
    x = 0.05 * torch.rand(8, 4, generator=gen)
    x[:, :2] += 0.3 + 0.15 * torch.rand(8, 2, generator=gen)
    with torch.no_grad():
        y = net(x).argmax(1)
    options = dict(steps=200, binary_search_steps=4, initial_const=0.1, lr=0.05)
    assert torch.equal(carlini_wagner_l2(net, x, y, **options), reference_cw(net, x, y, **options))


def test_run_attack_reports_throughput():
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(6, 1, 12, 12, generator=gen)
    result = run_attack(small_cnn(), x, small_cnn()(x).argmax(1), "cw", steps=20, binary_search_steps=2)
    assert result.points_per_second == pytest.approx(result.attacked / result.seconds)
