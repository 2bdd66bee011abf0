"""Spectral norms of layer operators, the product bound, certified radii and local estimates."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robustmargin.errors import UserError
from robustmargin.lipschitz import (certified_radii, first_order_distance_estimates, layer_input_shapes,
                                    layer_spectral_norms, layer_table, lipschitz_bound, local_lipschitz_estimates,
                                    operator_norm)
from robustmargin.margins import sample_margins
from robustmargin.models import HomogeneousNet, ModelSpec, build_model, parameter_norms


def explicit_sigma(layer: nn.Module, shape: tuple[int, ...]) -> float:
    """Largest singular value of the layer's linear part, as an explicit matrix built on the identity basis."""
    n = math.prod(shape)
    ref = layer.double()
    with torch.no_grad():
        rows = ref(torch.eye(n, dtype=torch.float64).reshape(n, *shape)) - ref(torch.zeros(1, *shape, dtype=torch.float64))
    layer.float()
    return float(torch.linalg.matrix_norm(rows.reshape(n, -1), 2))  # rows = (A e_i)ᵀ: the matrix Aᵀ


def net(layers: list[nn.Module], in_channels: int, image_size: int, num_classes: int) -> HomogeneousNet:
    return HomogeneousNet(layers, ModelSpec(name="mlp", in_channels=in_channels, image_size=image_size,
                                            num_classes=num_classes))


LAYERS = [
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 7, 7)),
    (lambda: nn.Conv2d(2, 5, 5, padding=2, bias=False), (2, 6, 6)),
    (lambda: nn.Conv2d(4, 3, 3, stride=2), (4, 9, 8)),  # stride leaves a remainder
    (lambda: nn.Conv2d(1, 6, 5, padding=2), (1, 10, 10)),  # one input channel: clustered top spectrum
    (lambda: nn.Linear(10, 7), (10,)),
]


@pytest.mark.parametrize("make, shape", LAYERS)
def test_operator_norm_matches_svd_of_explicit_operator(make, shape):
    torch.manual_seed(1)
    layer = make()
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_()  # ignored: only the linear part counts
    exact = explicit_sigma(layer, shape)
    for tol in (1e-6, 1e-9):
        sigma = operator_norm(layer, shape, tol=tol)
        assert exact * (1 - 1e-12) <= sigma <= exact * (1 + tol / 2)


def test_plain_power_iteration_is_block_one():
    torch.manual_seed(1)
    layer = nn.Linear(12, 9)
    exact = explicit_sigma(layer, (12,))
    assert exact * (1 - 1e-12) <= operator_norm(layer, (12,), block=1, tol=1e-9) <= exact * (1 + 5e-10)


def test_convolution_norm_is_not_the_reshaped_kernel_norm():
    torch.manual_seed(2)
    layer = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    kernel = float(torch.linalg.matrix_norm(layer.weight.detach().double().reshape(4, -1), 2))
    sigma = operator_norm(layer, (3, 8, 8))
    assert sigma == pytest.approx(explicit_sigma(layer, (3, 8, 8)), rel=1e-6)
    assert abs(sigma - kernel) > 1e-3 * kernel


def small_cnn(bias: bool = True) -> HomogeneousNet:
    torch.manual_seed(3)
    model = net([nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias), nn.ReLU(),
                 nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                 nn.Linear(16, 3, bias=False)], in_channels=2, image_size=8, num_classes=3)
    if bias:
        with torch.no_grad():
            model.weight_layers[0].bias.normal_()
    return model


def test_layer_spectral_norms_use_each_layers_input_shape():
    model = small_cnn()
    shapes = layer_input_shapes(model)
    assert shapes == [(2, 8, 8), (3, 4, 4), (16,)]
    sigmas = layer_spectral_norms(model)
    for layer, shape, sigma in zip(model.weight_layers, shapes, sigmas):
        assert sigma == pytest.approx(explicit_sigma(layer, shape), rel=1e-6)


@pytest.mark.parametrize("model", [small_cnn(), build_model(ModelSpec(name="cnn", width=0.25, image_size=8, bias="all"))])
def test_product_bound_dominates_empirical_ratios(model):
    torch.manual_seed(4)
    if model.spec.bias == "all":
        with torch.no_grad():
            for layer in model.weight_layers:
                layer.bias.normal_(std=0.1)
    bound = lipschitz_bound(layer_spectral_norms(model), model)
    shape = (model.spec.in_channels, model.spec.image_size, model.spec.image_size)
    x = torch.rand(64, *shape, dtype=torch.float64)
    for x2 in (torch.rand_like(x), x + 1e-3 * torch.randn_like(x)):
        with torch.no_grad():
            m = model.double()
            ratio = (m(x) - m(x2)).norm(dim=1) / (x - x2).flatten(1).norm(dim=1)
            model.float()
        assert (ratio <= bound).all()
        assert ratio.max() > 1e-3 * bound  # the test is not vacuous


def test_squared_relu_and_overlapping_pool_have_no_product_bound():
    relu2 = build_model(ModelSpec(name="mlp", activation="relu2", hidden=(4,), image_size=2))
    with pytest.raises(UserError):
        lipschitz_bound([1.0, 1.0], relu2)
    with pytest.raises(UserError):
        certified_radii(relu2, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]))
    pooled = net([nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=1), nn.Flatten(),
                  nn.Linear(2 * 4 * 4, 2)], in_channels=1, image_size=6, num_classes=2)
    with pytest.raises(UserError):
        lipschitz_bound([1.0, 1.0], pooled)
    assert lipschitz_bound([2.0, 3.0, 0.5]) == 3.0


def exact_linear_distances(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
                           y: torch.Tensor) -> torch.Tensor:
    """Minimal L2 distance (no box) to the decision boundary of f(x) = W x + b: min_j (f_y − f_j)/||W_y − W_j||."""
    f = x @ weight.T + (0 if bias is None else bias)
    gap = f.gather(1, y[:, None]) - f
    dist = gap / torch.cdist(weight, weight)[y]
    return dist.scatter(1, y[:, None], math.inf).amin(1)


def test_single_linear_layer_radius_is_the_exact_distance():
    torch.manual_seed(5)
    d, c = 8, 4
    model = net([nn.Flatten(), nn.Linear(d, c)], in_channels=d, image_size=1, num_classes=c)
    layer = model.weight_layers[0]
    x = 0.5 + 0.05 * torch.randn(200, d, 1, 1, dtype=torch.float64)
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    y = (x.flatten(1) @ w.T + b).argmax(1)
    exact = exact_linear_distances(w, b, x.flatten(1), y)
    radii = certified_radii(model, x, y)
    torch.testing.assert_close(radii, exact, rtol=1e-10, atol=0)
    # The distance is attained: stepping just past it, along the closest boundary's normal, flips the label.
    f = x.flatten(1) @ w.T + b
    ratio = ((f.gather(1, y[:, None]) - f) / torch.cdist(w, w)[y]).scatter(1, y[:, None], math.inf)
    j = ratio.argmin(1)
    normal = (w[y] - w[j]) / (w[y] - w[j]).norm(dim=1, keepdim=True)
    for scale, flips in ((1 + 1e-6, True), (1 - 1e-6, False)):
        x_adv = x.flatten(1) - scale * exact[:, None] * normal
        inside = ((x_adv >= 0) & (x_adv <= 1)).all(1)  # where the box does not bind
        assert inside.sum() > 100
        assert (((x_adv @ w.T + b).argmax(1) != y)[inside] == flips).all()


def test_deep_linear_model_radius_is_a_lower_bound_on_the_exact_distance():
    torch.manual_seed(6)
    d, h, c = 6, 9, 3
    model = net([nn.Flatten(), nn.Linear(d, h, bias=False), nn.Linear(h, c, bias=False)],
                in_channels=d, image_size=1, num_classes=c)
    x = torch.rand(300, d, 1, 1, dtype=torch.float64)
    w1, w2 = (m.weight.detach().double() for m in model.weight_layers)
    y = (x.flatten(1) @ (w2 @ w1).T).argmax(1)
    exact = exact_linear_distances(w2 @ w1, None, x.flatten(1), y)
    sigmas = layer_spectral_norms(model)
    radii = certified_radii(model, x, y, sigmas)
    assert (radii <= exact * (1 + 1e-9)).all()
    assert (radii > 0).all()
    q = sample_margins(model.double()(x), y)
    assert (radii >= q / (math.sqrt(2) * math.prod(sigmas)) * (1 - 1e-9)).all()


def test_radius_bounds_and_misclassified_points_on_a_cnn():
    model = build_model(ModelSpec(name="cnn", width=0.25, image_size=8))
    torch.manual_seed(7)
    x = torch.rand(100, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::3] = torch.randint(0, 10, (len(y[::3]),))  # some points become misclassified
    sigmas = layer_spectral_norms(model)
    radii = certified_radii(model, x, y, sigmas, batch_size=17)
    with torch.no_grad():
        q = sample_margins(model.double()(x.double()), y)
    model.float()
    correct = q > 0
    assert (radii[~correct] == 0).all() and (radii[correct] > 0).all()
    assert (radii >= q / (math.sqrt(2) * math.prod(sigmas)) * (1 - 1e-9)).all()
    # The local slope never exceeds the global bound, so the first-order estimate is never below the radius.
    slope = local_lipschitz_estimates(model, x, y)
    assert (slope <= math.sqrt(2) * math.prod(sigmas) * (1 + 1e-9)).all()
    first_order = first_order_distance_estimates(model, x, y)
    assert (first_order[correct] >= radii[correct] * (1 - 1e-9)).all() and (first_order[~correct] == 0).all()


def test_binary_scalar_output_radius_and_local_estimates_are_exact():
    torch.manual_seed(8)
    d = 5
    model = net([nn.Flatten(), nn.Linear(d, 1, bias=False)], in_channels=d, image_size=1, num_classes=1)
    w = model.weight_layers[0].weight.detach().double()[0]
    x = torch.rand(50, d, 1, 1, dtype=torch.float64)
    y = torch.where(x.flatten(1) @ w > 0, 1, -1)
    y[:5] = -y[:5]
    exact = (y * (x.flatten(1) @ w)).clamp(min=0) / w.norm()
    torch.testing.assert_close(certified_radii(model, x, y), exact, rtol=1e-10, atol=0)
    torch.testing.assert_close(first_order_distance_estimates(model, x, y), exact, rtol=1e-10, atol=0)
    torch.testing.assert_close(local_lipschitz_estimates(model, x, y), w.norm().expand(50), rtol=1e-12, atol=0)


def test_layer_table():
    model = build_model(ModelSpec(name="cnn", width=0.25, image_size=8))
    sigmas = [1.0, 2.0, 3.0, 4.0]
    rows = layer_table(model, sigmas)
    assert [r["layer"] for r in rows] == [1, 2, 3, 4]
    assert [r["kind"] for r in rows] == ["conv", "conv", "linear", "linear"]
    assert [r["sigma"] for r in rows] == sigmas
    assert [r["rho"] for r in rows] == parameter_norms(model)
    assert [r["order"] for r in rows] == model.orders
