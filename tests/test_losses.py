"""losses.py against mpmath (SCIENCE.md §3, §6 numerics): values and gradient directions at losses of
1e-5, 1e-300, 1e-800 and 1e-5000, the relative loss, log_softplus around its switch, log_sum / log_mean."""
from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustmargin.errors import UserError
from robustmargin.losses import (check_loss, exponent, log10, log_mean, log_softplus, log_sum, relative_loss,
                                 sample_log_losses)

MP = mpmath.mp.clone()
MP.dps = 50
LN10 = math.log(10.0)
LEVELS = [5, 300, 800, 5000]  # target mean loss 10^-level


# ---------------------------------------------------------------- mpmath references

def mp_sample_loss(row, label, loss: str):
    """ℓ_n exactly: row is a list of floats (C logits) or one float (scalar output, label ±1)."""
    if isinstance(row, float):
        terms = [-label * MP.mpf(row)]
    else:
        fy = MP.mpf(row[label])
        terms = [MP.mpf(v) - fy for j, v in enumerate(row) if j != label]
    s = MP.fsum(MP.exp(t) for t in terms)
    return s if loss == "exp" else MP.log1p(s)


def mp_mean_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str):
    rows, ys = logits.tolist(), labels.tolist()
    return MP.fsum(mp_sample_loss(r, y, loss) for r, y in zip(rows, ys)) / len(rows)


def mp_mean_loss_grad(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> list:
    """Exact gradient of the (linear-space) mean loss w.r.t. the logits, flattened."""
    rows, ys = logits.tolist(), labels.tolist()
    n = len(rows)
    out = []
    for row, y in zip(rows, ys):
        if isinstance(row, float):
            e = MP.exp(-y * MP.mpf(row))
            d = e if loss == "exp" else e / (1 + e)
            out.append(-y * d / n)
            continue
        fy = MP.mpf(row[y])
        es = [MP.exp(MP.mpf(v) - fy) if j != y else MP.mpf(0) for j, v in enumerate(row)]
        s = MP.fsum(es)
        k = MP.mpf(1) if loss == "exp" else 1 / (1 + s)  # dℓ/ds
        out.extend((-s * k / n) if j == y else (es[j] * k / n) for j in range(len(row)))
    return out


def mp_cosine(a: list, b: list):
    dot = MP.fsum(x * y for x, y in zip(a, b))
    return dot / (MP.sqrt(MP.fsum(x * x for x in a)) * MP.sqrt(MP.fsum(y * y for y in b)))


# ---------------------------------------------------------------- logits at a chosen loss level

def multiclass_logits(level: int, n: int = 4, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits whose per-sample CE loss is about 10^-level: the true class leads the best wrong
    class by level·ln10 + (0..2), wrong classes spread over a few units (so several contribute)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % c
    logits = 3.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    others = logits.scatter(1, labels[:, None], -math.inf).amax(1)
    gap = level * LN10 + 2.0 * torch.rand(n, generator=g, dtype=torch.float64)
    logits[torch.arange(n), labels] = others + gap
    return logits, labels


def scalar_logits(level: int, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1, -1, 1, -1][:n])
    margin = level * LN10 + 2.0 * torch.rand(n, generator=g, dtype=torch.float64)
    return labels * margin, labels


CASES = ([("ce", "multi", lv) for lv in LEVELS] + [("exp", "multi", lv) for lv in LEVELS]
         + [("logistic", "scalar", lv) for lv in LEVELS] + [("exp", "scalar", lv) for lv in LEVELS])


def make(kind: str, level: int):
    return multiclass_logits(level) if kind == "multi" else scalar_logits(level)


@pytest.mark.parametrize("loss,kind,level", CASES)
def test_log_mean_loss_matches_mpmath(loss, kind, level):
    logits, labels = make(kind, level)
    log_l = log_mean(sample_log_losses(logits, labels, loss))
    assert log_l.dtype == torch.float64
    assert math.isfinite(float(log_l))  # no underflow to -inf, even at 1e-5000
    ref = MP.log10(mp_mean_loss(logits, labels, loss))
    assert -level - 1 < float(ref) < -level + 1  # the construction hits the intended level
    got = log10(float(log_l))
    assert abs(got - float(ref)) <= 1e-9 * abs(float(ref))


@pytest.mark.parametrize("loss,kind,level", CASES)
def test_sample_log_losses_match_mpmath(loss, kind, level):
    logits, labels = make(kind, level)
    got = sample_log_losses(logits, labels, loss)
    assert torch.isfinite(got).all()
    for n, (row, y) in enumerate(zip(logits.tolist(), labels.tolist())):
        ref = float(MP.log(mp_sample_loss(row, y, loss)))
        assert abs(float(got[n]) - ref) <= 1e-12 * abs(ref)


@pytest.mark.parametrize("loss,kind,level", CASES)
def test_log_mean_gradient_direction_matches_mpmath(loss, kind, level):
    logits, labels = make(kind, level)
    logits = logits.clone().requires_grad_(True)
    log_mean(sample_log_losses(logits, labels, loss)).backward()
    grad = logits.grad.flatten().tolist()
    assert all(math.isfinite(v) for v in grad) and any(v != 0 for v in grad)
    ref = mp_mean_loss_grad(logits.detach(), labels, loss)
    cos = mp_cosine([MP.mpf(v) for v in grad], ref)
    assert cos >= 1 - 1e-9
    # and the scale: ∇ log L = ∇L / L
    lin = mp_mean_loss(logits.detach(), labels, loss)
    exact = [float(e / lin) for e in ref]
    top = max(abs(e) for e in exact)
    for got, e in zip(grad, exact):
        assert abs(got - e) <= 1e-9 * top


def test_float32_logits_are_cast_to_float64():
    logits, labels = multiclass_logits(800)
    l32 = logits.float()
    out = sample_log_losses(l32, labels)
    assert out.dtype == torch.float64
    ref = sample_log_losses(l32.double(), labels)
    assert torch.equal(out, ref)


def test_exponent_definition():
    logits = torch.tensor([[1.0, 3.0, -2.0], [0.5, 0.5, 4.0]], dtype=torch.float64)
    labels = torch.tensor([1, 2])
    z = exponent(logits, labels)
    expected = [math.log(math.exp(1 - 3) + math.exp(-2 - 3)), math.log(2 * math.exp(0.5 - 4))]
    assert z.tolist() == pytest.approx(expected, rel=1e-15)
    zs = exponent(torch.tensor([2.0, 3.0]), torch.tensor([1, -1]))
    assert zs.tolist() == [-2.0, 3.0]


# ---------------------------------------------------------------- relative loss

def plain_mean_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    logits = logits.double()
    if logits.ndim == 1:
        z = -labels.double() * logits
        return (torch.exp(z) if loss == "exp" else torch.nn.functional.softplus(z)).mean()
    if loss == "exp":
        fy = logits.gather(1, labels[:, None])
        return (torch.exp(logits - fy).sum(1) - 1).mean()
    return torch.nn.functional.cross_entropy(logits, labels)


@pytest.mark.parametrize("loss,scalar", [("ce", False), ("exp", False), ("logistic", True), ("exp", True)])
@pytest.mark.parametrize("frame", [0.3, 7e-3])
def test_relative_loss_gradient_is_true_gradient_over_frame(loss, scalar, frame):
    g = torch.Generator().manual_seed(5)
    if scalar:
        logits = torch.randn(6, generator=g)
        labels = torch.tensor([1, -1, 1, 1, -1, -1])
    else:
        logits = 2 * torch.randn(6, 4, generator=g)
        labels = torch.tensor([0, 1, 2, 3, 0, 1])
    a = logits.clone().requires_grad_(True)
    r = relative_loss(a, labels, math.log(frame), loss)
    r.backward()
    b = logits.clone().requires_grad_(True)
    true = plain_mean_loss(b, labels, loss)
    true.backward()
    assert r.item() == pytest.approx(true.item() / frame, rel=1e-12)
    torch.testing.assert_close(a.grad.double(), b.grad.double() / frame, rtol=1e-6, atol=0)  # float32 grads
    # float64 logits: agreement to float64 precision
    a64 = logits.double().requires_grad_(True)
    b64 = logits.double().requires_grad_(True)
    relative_loss(a64, labels, math.log(frame), loss).backward()
    plain_mean_loss(b64, labels, loss).backward()
    torch.testing.assert_close(a64.grad, b64.grad / frame, rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss", ["ce", "exp"])
def test_relative_loss_at_1e_800_is_exact_gradient_over_frame(loss):
    logits, labels = multiclass_logits(800, seed=2)
    lin = mp_mean_loss(logits, labels, loss)
    log_frame = float(MP.log(lin)) - 0.25  # F a bit below the true loss: R ≈ e^0.25
    x = logits.clone().requires_grad_(True)
    r = relative_loss(x, labels, log_frame, loss)
    assert r.item() == pytest.approx(float(lin / MP.exp(log_frame)), rel=1e-9)
    r.backward()
    ref = [float(e / MP.exp(log_frame)) for e in mp_mean_loss_grad(logits, labels, loss)]
    top = max(abs(v) for v in ref)
    assert top > 1e-3  # order one: not underflowed
    for got, exact in zip(x.grad.flatten().tolist(), ref):
        assert abs(got - exact) <= 1e-9 * top


# ---------------------------------------------------------------- log_softplus

def mp_log_softplus(z: float):
    return MP.log(MP.log1p(MP.exp(MP.mpf(z))))


def mp_log_softplus_deriv(z: float):
    e = MP.exp(MP.mpf(z))
    return e / (1 + e) / MP.log1p(e)


def test_log_softplus_continuous_at_switch():
    pts = [-30.0, math.nextafter(-30.0, 0.0), math.nextafter(-30.0, -math.inf), -30.0 + 1e-9, -30.0 - 1e-9,
           -30.0 + 1e-4, -30.0 - 1e-4, -29.5, -30.5, -31.0, -29.0]
    z = torch.tensor(pts, dtype=torch.float64, requires_grad=True)
    v = log_softplus(z)
    v.sum().backward()
    for zi, vi, gi in zip(pts, v.tolist(), z.grad.tolist()):
        assert abs(vi - float(mp_log_softplus(zi))) <= 1e-14 * abs(vi)
        assert abs(gi - float(mp_log_softplus_deriv(zi))) <= 1e-12
    # no visible jump across the switch: the two sides differ by about the distance in z
    lo, hi = log_softplus(torch.tensor([-30.0 - 1e-9, -30.0 + 1e-9], dtype=torch.float64)).tolist()
    assert abs((hi - lo) - 2e-9) < 1e-13


def test_log_softplus_wide_range_matches_mpmath():
    pts = [-20000.0, -2000.0, -700.0, -100.0, -40.0, -10.0, -1.0, 0.0, 1.0, 10.0, 19.0, 25.0, 100.0, 700.0]
    got = log_softplus(torch.tensor(pts, dtype=torch.float64)).tolist()
    for zi, gi in zip(pts, got):
        ref = float(mp_log_softplus(zi))
        assert abs(gi - ref) <= 1e-9 * max(1.0, abs(ref)), zi


def test_log_softplus_gradient_finite_for_large_z():
    # A badly classified sample (z = logit gap > ~709.8) must not give a NaN gradient; d/dz log softplus(z)
    # = sigmoid(z)/softplus(z) ≈ 1/z there.
    z = torch.tensor([705.0, 720.0, 800.0, 1e4], dtype=torch.float64, requires_grad=True)
    log_softplus(z).sum().backward()
    assert torch.isfinite(z.grad).all(), z.grad
    torch.testing.assert_close(z.grad, 1 / z.detach(), rtol=1e-9, atol=0)


def test_ce_gradient_finite_for_badly_misclassified_sample():
    logits = torch.tensor([[0.0, 800.0, 1.0], [5.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0])
    log_mean(sample_log_losses(logits, labels, "ce")).backward()
    assert torch.isfinite(logits.grad).all(), logits.grad


# ---------------------------------------------------------------- log_sum / log_mean properties

log_losses = st.lists(st.floats(min_value=-12000.0, max_value=5.0, allow_nan=False), min_size=1, max_size=12)


def mp_log_mean(values: list[float]):
    return MP.log(MP.fsum(MP.exp(MP.mpf(v)) for v in values) / len(values))


def close(a: float, b, scale: float) -> bool:
    return abs(a - float(b)) <= 1e-12 * max(1.0, abs(scale))


@settings(max_examples=60, deadline=None)
@given(log_losses, st.integers(min_value=0, max_value=11))
def test_log_mean_with_duplicated_sample(values, k):
    k %= len(values)
    dup = values + [values[k]]
    got = float(log_mean(torch.tensor(dup, dtype=torch.float64)))
    assert close(got, mp_log_mean(dup), min(values))
    # duplicating the whole batch leaves the mean unchanged; log_sum gains exactly log 2
    t = torch.tensor(values, dtype=torch.float64)
    tt = torch.cat([t, t])
    assert close(float(log_mean(tt)), float(log_mean(t)), min(values))
    assert close(float(log_sum(tt)), float(log_sum(t)) + math.log(2), min(values))
    # permutation invariance and the definition log_mean = log_sum − log N
    assert close(float(log_mean(t.flip(0))), float(log_mean(t)), min(values))
    assert float(log_mean(t)) == float(log_sum(t)) - math.log(len(values))


@settings(max_examples=40, deadline=None)
@given(st.floats(min_value=-12000.0, max_value=5.0), st.integers(min_value=1, max_value=30))
def test_log_mean_of_identical_values(a, n):
    assert close(float(log_mean(torch.full((n,), a, dtype=torch.float64))), a, a)


@settings(max_examples=40, deadline=None)
@given(log_losses, st.floats(min_value=-5000.0, max_value=0.0))
def test_log_sum_shift(values, c):
    t = torch.tensor(values, dtype=torch.float64)
    assert close(float(log_sum(t + c)), float(log_sum(t)) + c, min(values) + c)


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=3), st.integers(min_value=0, max_value=10_000))
def test_batch_with_duplicated_sample_matches_mpmath(level_index, seed):
    logits, labels = multiclass_logits(LEVELS[level_index], seed=seed)
    k = seed % len(labels)
    logits = torch.cat([logits, logits[k:k + 1]])
    labels = torch.cat([labels, labels[k:k + 1]])
    got = float(log_mean(sample_log_losses(logits, labels)))
    ref = MP.log(mp_mean_loss(logits, labels, "ce"))
    assert abs(got - float(ref)) <= 1e-11 * abs(float(ref))


def test_check_loss():
    for name in ("ce", "logistic", "exp"):
        assert check_loss(name) == name
    with pytest.raises(UserError, match="hinge"):
        check_loss("hinge")
