"""margins.py against SCIENCE.md §2, §4: sample margins, normalized and layer-wise normalized margins and
their invariances, the smoothed margin numerator against mpmath, γ̃ ≤ γ̄, support counts."""
from __future__ import annotations

import copy
import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustmargin.losses import log_sum, sample_log_losses
from robustmargin.margins import (layerwise_normalized_margin, log_neg_log_expm1, norm_product,
                                  normalized_margin, sample_margins, smoothed_margin_numerator,
                                  smoothed_normalized_margin, support_counts)
from robustmargin.models import ModelSpec, build_model, parameter_norms

MP = mpmath.mp.clone()
MP.dps = 50
LN10 = math.log(10.0)


def test_sample_margins_direct_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 6, generator=g)
    labels = torch.randint(0, 6, (20,), generator=g)
    q = sample_margins(logits, labels)
    assert q.dtype == torch.float64 and q.shape == (20,)
    for n in range(20):
        row = logits[n].double().tolist()
        y = int(labels[n])
        expected = row[y] - max(v for j, v in enumerate(row) if j != y)
        assert float(q[n]) == expected
    assert (q < 0).any() and (q > 0).any()  # both signs exercised


def test_sample_margins_hand_example_and_scalar():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 4.0], [-1.0, -3.0, -2.0]])
    q = sample_margins(logits, torch.tensor([0, 1, 2]))
    assert q.tolist() == [0.5, 0.0, -1.0]
    qs = sample_margins(torch.tensor([2.0, -3.0, 0.5]), torch.tensor([1, -1, -1]))
    assert qs.tolist() == [2.0, 3.0, -0.5]


# ---------------------------------------------------------------- invariances on a small model

def small_model(activation: str, bias: str = "first", seed: int = 0):
    torch.manual_seed(seed)
    spec = ModelSpec(name="mlp", bias=bias, activation=activation, hidden=(12, 8), image_size=4, num_classes=3)
    model = build_model(spec).double()
    with torch.no_grad():
        for m in model.weight_layers:
            if m.bias is not None:
                m.bias.normal_(0, 0.3)
    x = torch.rand(16, 1, 4, 4, dtype=torch.float64)
    y = torch.arange(16) % 3
    return model, x, y


def margins_of(model, x, y) -> tuple[float, float, float, float]:
    with torch.no_grad():
        q_min = float(sample_margins(model(x), y).min())
    norms = parameter_norms(model)
    rho = math.sqrt(sum(r * r for r in norms))
    return (q_min, normalized_margin(q_min, rho, model.order),
            layerwise_normalized_margin(q_min, norms, model.orders), rho)


def rescaled(model, factors):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for grp, c in zip(other.layer_groups(), factors):
            for p in grp:
                p.mul_(c)
    return other


@pytest.mark.parametrize("activation", ["relu", "relu2"])
def test_normalized_margins_invariant_to_global_rescaling(activation):
    model, x, y = small_model(activation)
    q, gn, gl, rho = margins_of(model, x, y)
    for c in (0.3, 1.7, 10.0):
        q2, gn2, gl2, rho2 = margins_of(rescaled(model, [c] * 3), x, y)
        assert rho2 == pytest.approx(c * rho, rel=1e-13)
        assert q2 == pytest.approx(q * c ** model.order, rel=1e-10)
        assert gn2 == pytest.approx(gn, rel=1e-10)
        assert gl2 == pytest.approx(gl, rel=1e-10)


@pytest.mark.parametrize("activation", ["relu", "relu2"])
def test_layerwise_margin_invariant_to_per_group_rescaling(activation):
    model, x, y = small_model(activation)
    q, gn, gl, _ = margins_of(model, x, y)
    factors = [3.0, 0.25, 1.9]
    q2, gn2, gl2, _ = margins_of(rescaled(model, factors), x, y)
    assert q2 == pytest.approx(q * math.prod(c ** a for c, a in zip(factors, model.orders)), rel=1e-10)
    assert gl2 == pytest.approx(gl, rel=1e-10)
    assert abs(gn2 / gn - 1) > 1e-2  # the global normalization is not invariant to this


def test_norm_product():
    norms, orders = [2.0, 0.5, 3.0], [4, 2, 1]
    assert norm_product(norms, orders) == pytest.approx(2.0 ** 4 * 0.5 ** 2 * 3.0, rel=1e-14)
    assert layerwise_normalized_margin(6.0, norms, orders) == pytest.approx(6.0 / 12.0, rel=1e-14)
    assert normalized_margin(6.0, 2.0, 3) == 0.75
    # equal norms: ∏ ρ_i^{a_i} = ρ_i^L
    assert norm_product([1.5] * 3, [1, 1, 1]) == pytest.approx(1.5 ** 3, rel=1e-14)


# ---------------------------------------------------------------- smoothed margin numerator

def mp_numerator(log_s: float):
    s = MP.exp(MP.mpf(log_s))
    return -MP.log(MP.expm1(s))


@pytest.mark.parametrize("log_s", [math.log(1e-1), math.log(1e-20), math.log(1e-300), -800 * LN10,
                                   -5000 * LN10, -30.0, math.nextafter(-30.0, 0.0), -29.9, -30.1,
                                   math.log(0.5), math.log(math.log(2)), 0.0, math.log(5.0), math.log(800.0)])
def test_smoothed_numerator_against_mpmath(log_s):
    got = log_neg_log_expm1(log_s)
    ref = float(mp_numerator(log_s))
    assert abs(got - ref) <= 1e-13 * max(1.0, abs(ref))
    assert smoothed_margin_numerator(log_s, "ce") == got
    assert smoothed_margin_numerator(log_s, "logistic") == got
    assert smoothed_margin_numerator(log_s, "exp") == -log_s


def test_smoothed_numerator_sign_at_log2():
    # S < log 2  ⇔  −log(e^S − 1) > 0
    assert log_neg_log_expm1(math.log(0.69)) > 0
    assert log_neg_log_expm1(math.log(0.70)) < 0


def test_smoothed_normalized_margin_divides_by_scale():
    log_s = -800 * LN10
    assert smoothed_normalized_margin(log_s, "ce", 4.0) == pytest.approx(log_neg_log_expm1(log_s) / 4.0, rel=1e-15)
    assert smoothed_normalized_margin(log_s, "exp", 2.0) == pytest.approx(800 * LN10 / 2.0, rel=1e-15)


# ---------------------------------------------------------------- γ̃ ≤ γ̄

def separable(seed: int, n: int, c: int, gap_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, c))
    labels = rng.integers(0, c, size=n)
    others = np.where(np.eye(c, dtype=bool)[labels], -np.inf, logits).max(1)
    logits[np.arange(n), labels] = others + gap_scale * rng.uniform(0.001, 1.0, size=n)
    return torch.from_numpy(logits), torch.from_numpy(labels)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2 ** 31), st.integers(1, 12), st.integers(2, 6),
       st.sampled_from([0.05, 1.0, 30.0, 700.0, 5000.0]), st.floats(0.1, 10.0), st.integers(1, 5))
def test_smoothed_at_most_normalized_ce(seed, n, c, gap_scale, rho, order):
    logits, labels = separable(seed, n, c, gap_scale)
    q_min = float(sample_margins(logits, labels).min())
    log_s = float(log_sum(sample_log_losses(logits, labels, "ce")))
    num = smoothed_margin_numerator(log_s, "ce")
    assert num <= q_min + 1e-10 * max(1.0, abs(q_min))
    scale = rho ** order
    assert smoothed_normalized_margin(log_s, "ce", scale) <= normalized_margin(q_min, rho, order) * (1 + 1e-10) + 1e-300
    # and not loose by more than log N(C−1) + S (−log(e^S − 1) ≥ −log S − S, S ≤ N(C−1)e^{−q_min})
    if log_s < -5:
        assert num >= q_min - math.log(n * (c - 1)) - math.exp(log_s) - 1e-10 * max(1.0, abs(q_min))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2 ** 31), st.integers(1, 12), st.sampled_from([0.05, 1.0, 30.0, 700.0, 5000.0]))
def test_exp_loss_sandwich(seed, n, gap_scale):
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(rng.choice([-1, 1], size=n))
    logits = labels.double() * torch.from_numpy(gap_scale * rng.uniform(0.001, 1.0, size=n))
    q_min = float(sample_margins(logits, labels).min())
    num = smoothed_margin_numerator(float(log_sum(sample_log_losses(logits, labels, "exp"))), "exp")
    tol = 1e-10 * max(1.0, abs(q_min))
    assert q_min - math.log(n) - tol <= num <= q_min + tol


def test_smoothed_equals_margin_for_single_binary_sample():
    # N = 1, two classes: S = log(1 + e^{−q}) so −log(e^S − 1) = q exactly
    for q in (0.5, 20.0, 700.0, 11000.0):
        logits = torch.tensor([[q, 0.0]], dtype=torch.float64)
        log_s = float(log_sum(sample_log_losses(logits, torch.tensor([0]))))
        assert smoothed_margin_numerator(log_s, "ce") == pytest.approx(q, rel=1e-12)


# ---------------------------------------------------------------- support counts

def test_support_counts_hand_example():
    margins = torch.tensor([1.0, 3.0, 6.0, 11.0, 21.0, 1.5], dtype=torch.float64)
    # thresholds 1 + k ln 10 = 3.30, 5.61, 7.91, 10.21, 12.51, 14.82, 17.12
    assert support_counts(margins) == [3, 3, 4, 4, 5, 5, 5]
    assert support_counts(margins, decades=3) == [3, 3, 4]
    # strict inequality exactly at the threshold
    edge = torch.tensor([0.0, math.log(10.0)], dtype=torch.float64)
    assert support_counts(edge, decades=2) == [1, 2]
    # negative margins too (a misclassified minimum)
    assert support_counts(torch.tensor([-2.0, -1.0, 5.0]), decades=2) == [2, 2]
