"""KKT residuals of the max-margin problem (P) and the gradient alignment β."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from robustmargin.errors import UserError
from robustmargin.kkt import float64_params, gradient_alignment, kkt_residuals, margins_at, per_sample_margin_gradients
from robustmargin.losses import log_sum, sample_log_losses
from robustmargin.margins import sample_margins
from robustmargin.models import HomogeneousNet, ModelSpec, build_model


def net(layers: list[nn.Module], d: int, num_classes: int) -> HomogeneousNet:
    return HomogeneousNet(layers, ModelSpec(name="mlp", in_channels=d, image_size=1, num_classes=num_classes))


def svm_direction(z: np.ndarray) -> np.ndarray:
    """Hard-margin SVM without bias on rows z_n = y_n x_n: argmin ½||w||² s.t. z_n·w ≥ 1.

    Dual QP max Σα − ½αᵀGα, α ≥ 0 (L-BFGS-B) to find the support vectors, then an exact solve on them."""
    gram = z @ z.T
    res = minimize(lambda a: 0.5 * a @ gram @ a - a.sum(), np.zeros(len(z)), jac=lambda a: gram @ a - 1,
                   bounds=[(0, None)] * len(z), method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000})
    sv = res.x > 1e-6 * res.x.max()
    alpha = np.linalg.solve(z[sv] @ z[sv].T, np.ones(sv.sum()))
    w = z[sv].T @ alpha
    assert (alpha > 0).all() and (z @ w >= 1 - 1e-9).all()  # a genuine KKT point of the SVM
    return w


def separable(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = np.sign(x @ rng.normal(size=d))
    return x, y


def linear_model(w: np.ndarray, two_classes: bool) -> HomogeneousNet:
    """f(x) = w·x (one output, labels ±1) or, with two classes, logits (−w·x/2, w·x/2), whose margin is w·x."""
    d = len(w)
    model = net([nn.Flatten(), nn.Linear(d, 2 if two_classes else 1, bias=False)], d, 2 if two_classes else 1).double()
    weight = torch.tensor(np.stack([-w / 2, w / 2]) if two_classes else w[None])
    with torch.no_grad():
        model.weight_layers[0].weight.copy_(weight)
    return model


def labels(y: np.ndarray, two_classes: bool) -> torch.Tensor:
    return torch.tensor((y > 0).astype(np.int64) if two_classes else y.astype(np.int64))


@pytest.mark.parametrize("two_classes", [False, True])
def test_svm_direction_is_a_kkt_point_and_a_random_separator_is_not(two_classes):
    x, y = separable(8, 12, seed=0)  # d > n: the h_n are independent, so λ is unique
    w_svm = svm_direction(y[:, None] * x)
    xt, yt = torch.tensor(x), labels(y, two_classes)
    r = kkt_residuals(linear_model(3.7 * w_svm, two_classes), xt, yt)
    assert r["eps"] < 1e-10 and abs(r["delta"]) < 1e-10
    assert r["k_used"] == 8 and (r["lambda"] >= 0).all()
    assert r["q_min"] == pytest.approx(3.7, rel=1e-9)
    rng = np.random.default_rng(1)
    w_rand = w_svm / np.linalg.norm(w_svm) + 0.3 * rng.normal(size=12) / math.sqrt(12)
    assert (y * (x @ w_rand)).min() > 0  # still separating
    assert kkt_residuals(linear_model(w_rand, two_classes), xt, yt)["eps"] > 0.05


def test_low_dimensional_svm_direction_is_stationary():
    x, y = separable(40, 3, seed=2)
    w_svm = svm_direction(y[:, None] * x)
    r = kkt_residuals(linear_model(w_svm, False), torch.tensor(x), torch.tensor(y.astype(np.int64)), k=10)
    assert r["eps"] < 1e-9 and r["k_used"] == 10


def relu_net(d: int = 5, h: int = 7, c: int = 3, bias: bool = True, seed: int = 0) -> HomogeneousNet:
    torch.manual_seed(seed)
    return net([nn.Flatten(), nn.Linear(d, h, bias=bias), nn.ReLU(), nn.Linear(h, c, bias=False)], d, c).double()


def self_labelled(model: nn.Module, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, d, dtype=torch.float64)
    with torch.no_grad():
        return x, model(x).argmax(1)


@pytest.mark.parametrize("activation", ["relu", "relu2"])
def test_residuals_are_invariant_to_rescaling_theta(activation):
    torch.manual_seed(3)
    model = build_model(ModelSpec(name="mlp", hidden=(6, 5), activation=activation, bias="first", image_size=2,
                                  num_classes=3)).double()
    x = torch.rand(30, 1, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    base = kkt_residuals(model, x, y, k=12)
    params = {k: v.clone() for k, v in float64_params(model).items()}
    for c in (0.01, 7.3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(c)
        r = kkt_residuals(model, x, y, k=12)
        assert r["eps"] == pytest.approx(base["eps"], rel=1e-8)
        assert r["delta"] == pytest.approx(base["delta"], rel=1e-8, abs=1e-12)
        assert r["q_min"] == pytest.approx(base["q_min"] * c ** model.order, rel=1e-9)
        model.load_state_dict(params)
    # θ / q_min^{1/L} with L = Σ orders has min margin exactly 1, also for squared ReLU
    scale = base["q_min"] ** (-1 / model.order)
    hat = {k: v * scale for k, v in params.items()}
    assert float(margins_at(model, hat, x, y).min()) == pytest.approx(1.0, rel=1e-12)
    assert 0 <= base["eps"] <= 1 and base["delta"] >= 0


def test_per_sample_gradients_match_autograd_and_euler():
    model = relu_net()
    x, y = self_labelled(model, 9, 5)
    h = per_sample_margin_gradients(model, x, y, chunk_size=4)
    params = list(model.parameters())
    for n in range(len(x)):
        q = sample_margins(model(x[n:n + 1]), y[n:n + 1])[0]
        ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(q, params)])
        torch.testing.assert_close(h[n], ref, rtol=1e-12, atol=1e-14)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    with torch.no_grad():
        q = sample_margins(model(x), y)
    torch.testing.assert_close(h @ theta, model.order * q, rtol=1e-10, atol=1e-12)  # ⟨θ, ∇q⟩ = L q


def test_bad_inputs_are_rejected():
    model = relu_net()
    x, y = self_labelled(model, 9, 5)
    with pytest.raises(UserError, match="classified"):
        kkt_residuals(model, x, (y + 1) % 3)
    with pytest.raises(UserError):
        kkt_residuals(model, x, y, k=0)
    biased = build_model(ModelSpec(name="mlp", hidden=(4,), bias="all", image_size=2))
    xb = torch.rand(4, 1, 2, 2)
    with pytest.raises(UserError, match="homogeneous"):
        kkt_residuals(biased, xb, biased(xb).argmax(1))


def test_kkt_on_a_small_cnn_float32():
    model = build_model(ModelSpec(name="cnn", width=0.25, image_size=8))
    x = torch.rand(40, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    r = kkt_residuals(model, x, y, k=100)
    assert r["k_used"] == 40 and len(r["lambda"]) == 40
    assert 0 <= r["eps"] < 1 and r["delta"] >= 0 and r["q_min"] > 0


def test_alignment_is_one_at_the_max_margin_direction_in_the_exponential_limit():
    # Support vectors z1 = (1, 1), z2 = (1, −1) are symmetric about the max-margin direction (1, 0), so their
    # equal loss weights at large scale point −∇S along it; z3, z4 have larger margins (3, 2).
    z = np.array([[1.0, 1.0], [1.0, -1.0], [3.0, 0.5], [2.0, -2.0]])
    y = np.array([1, -1, 1, -1])
    x = torch.tensor(y[:, None] * z)
    for c, loss in ((40.0, "exp"), (40.0, "ce"), (2000.0, "exp")):  # at c = 2000 every loss underflows float64
        model = linear_model(c * np.array([1.0, 0.0]), False)
        assert gradient_alignment(model, x, torch.tensor(y), loss) == pytest.approx(1.0, abs=1e-12)
    model = linear_model(np.array([1.0, 0.3]), False)
    assert gradient_alignment(model, x, torch.tensor(y), "exp") < 0.999


def test_alignment_matches_direct_gradient_and_batching():
    model = relu_net(seed=4)
    x = torch.randn(25, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (25,))
    for loss in ("ce", "exp"):
        s = log_sum(sample_log_losses(model(x), y, loss)).exp()
        params = list(model.parameters())
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(s, params)])
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        direct = float(-(theta @ g) / (theta.norm() * g.norm()))
        for batch_size in (1000, 4):
            beta = gradient_alignment(model, x, y, loss, batch_size=batch_size)
            assert beta == pytest.approx(direct, abs=1e-12)
            assert -1 <= beta <= 1
