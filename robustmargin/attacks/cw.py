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

    for round_ in range(binary_search_steps):
        if binary_search_steps >= 10 and round_ == binary_search_steps - 1:
            # reference: with 10+ rounds, the last one retries at the best known const
            const = torch.clamp(upper, max=1e10)
        found = _optimize(model, x, y, w0, const.to(x.dtype), best_d2, best_adv, steps=steps, lr=lr,
                          confidence=confidence, check_every=math.ceil(steps / 10) if abort_early else 0)
        upper = torch.where(found, torch.minimum(upper, const), upper)
        lower = torch.where(found, lower, torch.maximum(lower, const))
        const = torch.where(upper < _UPPER_SENTINEL, (lower + upper) / 2, const * 10)

    return best_adv


def _optimize(model: nn.Module, x: Tensor, y: Tensor, w0: Tensor, const: Tensor, best_d2: Tensor,
              best_adv: Tensor, *, steps: int, lr: float, confidence: float, check_every: int) -> Tensor:
    """One round of Adam steps at fixed constants; improves best_d2/best_adv in place; returns found.

    The state of the samples still running lives in compact tensors, re-indexed only when the
    abort-early test (every `check_every` steps; 0 = never) drops samples. The step itself reads
    nothing back to the host, so on a GPU the steps between two checks queue without waiting.
    """
    found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    active = torch.arange(len(x), device=x.device)
    state = {
        "w0": w0, "x": x, "y": y, "const": const, "found": found.clone(),
        "best_d2": best_d2.clone(), "best_adv": best_adv.clone(),
        "modifier": torch.zeros_like(x), "m": torch.zeros_like(x), "v": torch.zeros_like(x),
        "prev_loss": torch.full((len(x),), math.inf, dtype=x.dtype, device=x.device),
    }

    def write_back() -> None:
        best_d2[active], best_adv[active], found[active] = state["best_d2"], state["best_adv"], state["found"]

    for step in range(steps):
        s = state
        mod = s["modifier"].requires_grad_(True)
        x_adv = (torch.tanh(s["w0"] + mod) + 1) / 2
        logits = model(x_adv)
        true, other = label_and_best_other(logits, s["y"])
        d2 = flat_sq_norm(x_adv - s["x"])
        loss = d2 + s["const"] * torch.clamp(true - other + confidence, min=0)
        (grad,) = torch.autograd.grad(loss.sum(), mod)

        with torch.no_grad():
            # record the evaluated (pre-update) point, as the reference does
            adv = succeeded(logits, s["y"], true, other, confidence)
            better = adv & (d2 < s["best_d2"])
            s["best_d2"] = torch.where(better, d2, s["best_d2"])
            s["best_adv"] = torch.where(batch_view(better, x_adv), x_adv, s["best_adv"])
            s["found"] = s["found"] | adv

            t = step + 1
            s["m"] = _ADAM_BETAS[0] * s["m"] + (1 - _ADAM_BETAS[0]) * grad
            s["v"] = _ADAM_BETAS[1] * s["v"] + (1 - _ADAM_BETAS[1]) * grad.square()
            m_hat = s["m"] / (1 - _ADAM_BETAS[0] ** t)
            v_hat = s["v"] / (1 - _ADAM_BETAS[1] ** t)
            s["modifier"] = mod.detach() - lr * m_hat / (v_hat.sqrt() + _ADAM_EPS)

            if check_every and step % check_every == 0:
                loss = loss.detach()
                progressing = loss <= 0.9999 * s["prev_loss"]
                s["prev_loss"] = loss
                if not bool(progressing.all()):  # the round's only host reads
                    write_back()
                    keep = torch.nonzero(progressing).flatten()
                    active = active[keep]
                    if active.numel() == 0:
                        return found
                    state = {key: value[keep] for key, value in s.items()}

    write_back()
    return found
