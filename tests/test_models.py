"""models.py against SCIENCE.md §1 and §6: homogeneity, multi-homogeneity, Euler's identity, orders,
the paper CNN's layer sizes, parameter norms and input checks.

Every numerical check runs on a float64 copy of a small model whose biases are made non-zero (zero biases
would make every bias question vacuous) and whose layers are rescaled so that activations stay of order
one on the test inputs (with squared ReLU the raw He-initialised VGG would overflow float64)."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from robustmargin.errors import UserError
from robustmargin.models import HomogeneousNet, ModelSpec, build_model, parameter_norms



SIZES = {  # name -> small spec arguments (VGG needs image size 32 for its five pools)
    "cnn": dict(width=0.125, image_size=12, in_channels=1),
    "vgg16": dict(width=1 / 16, image_size=32, in_channels=3),
    "mlp": dict(hidden=(16, 8), image_size=5, in_channels=1),
}
VARIANTS = [(name, bias, act) for name, bias, act in itertools.product(SIZES, ("none", "first"), ("relu", "relu2"))]


def spec_for(name: str, bias: str, activation: str, num_classes: int = 10) -> ModelSpec:
    return ModelSpec(name=name, bias=bias, activation=activation, num_classes=num_classes, **SIZES[name])


def inputs(spec: ModelSpec, n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, spec.in_channels, spec.image_size, spec.image_size, generator=g, dtype=torch.float64)


def prepared(spec: ModelSpec, x: torch.Tensor, seed: int = 0) -> HomogeneousNet:
    """float64 model with random non-zero biases, each weight layer rescaled so its output has unit RMS on x."""
    torch.manual_seed(seed)
    model = build_model(spec).double()
    h = x
    with torch.no_grad():
        for m in model.body:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if m.bias is not None:
                    m.bias.copy_(0.3 * torch.randn_like(m.bias))
                out = m(h)
                scale = out.square().mean().sqrt()
                m.weight.div_(scale)
                if m.bias is not None:
                    m.bias.div_(scale)
            h = m(h)
    assert torch.isfinite(h).all() and h.abs().max() > 1e-3
    return model


def scaled(model: HomogeneousNet, factors: list[float]) -> HomogeneousNet:
    """A copy with every parameter of group i multiplied by factors[i]."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for group, c in zip(other.layer_groups(), factors):
            for p in group:
                p.mul_(c)
    return other


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("name,bias,act", VARIANTS)
def test_homogeneity_in_theta(name, bias, act):
    spec = spec_for(name, bias, act)
    x = inputs(spec)
    model = prepared(spec, x)
    assert model.is_homogeneous
    f = model(x).detach()
    L = model.order
    for u in (0.7, -0.45):  # c = e^{u/L}, so c^L = e^u stays moderate even for L = 16383 (VGG, relu2)
        c = math.exp(u / L)
        g = scaled(model, [c] * len(model.orders))(x).detach()
        assert rel_err(g, f * math.exp(u)) < 1e-8
        # the check is sharp: an order off by one (factor c^{±1} = e^{±u/L}, |u|/L ≥ 2.7e-5) would show
        assert rel_err(g, f * c ** (L - 1)) > 1e-6 and rel_err(g, f * c ** (L + 1)) > 1e-6


@pytest.mark.parametrize("name,bias,act", VARIANTS)
def test_multi_homogeneity_per_group(name, bias, act):
    spec = spec_for(name, bias, act)
    x = inputs(spec)
    model = prepared(spec, x)
    f = model(x).detach()
    g = torch.Generator().manual_seed(1)
    u = (torch.rand(len(model.orders), generator=g, dtype=torch.float64) - 0.5).tolist()  # log c_i^{a_i}
    factors = [math.exp(ui / a) for ui, a in zip(u, model.orders)]
    out = scaled(model, factors)(x).detach()
    assert rel_err(out, f * math.exp(sum(u))) < 1e-8
    # one group at a time: f scales by c_i^{a_i} exactly
    for i, a in enumerate(model.orders):
        c = 1.5 ** (1 / a)
        one = [1.0] * len(model.orders)
        one[i] = c
        assert rel_err(scaled(model, one)(x).detach(), f * 1.5) < 1e-8


@pytest.mark.parametrize("name,bias,act", VARIANTS)
def test_euler_identity(name, bias, act):
    spec = spec_for(name, bias, act, num_classes=4)
    x = inputs(spec, n=2)
    model = prepared(spec, x)
    groups = model.layer_groups()
    params = [p for grp in groups for p in grp]
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}  # groups cover θ exactly once
    f = model(x)
    fv = f.detach()
    scale = float(fv.abs().max())
    for n, j in itertools.product(range(f.shape[0]), range(f.shape[1])):
        grads = torch.autograd.grad(f[n, j], params, retain_graph=True)
        k, total = 0, 0.0
        for grp, a in zip(groups, model.orders):
            inner = sum(float((p.detach() * gr).sum()) for p, gr in zip(grp, grads[k:k + len(grp)]))
            k += len(grp)
            assert abs(inner - a * float(fv[n, j])) <= 1e-9 * a * scale
            total += inner
        assert abs(total - model.order * float(fv[n, j])) <= 1e-9 * model.order * scale


@pytest.mark.parametrize("name", list(SIZES))
def test_bias_all_is_not_homogeneous(name):
    spec = spec_for(name, "all", "relu")
    x = inputs(spec)
    model = prepared(spec, x)
    assert not model.is_homogeneous
    assert all(m.bias is not None for m in model.weight_layers)
    f = model(x).detach()
    g = scaled(model, [2.0] * len(model.orders))(x).detach()
    assert rel_err(g, f * 2.0 ** model.order) > 1e-3


def test_orders_relu2_and_relu():
    mlp = build_model(ModelSpec(name="mlp", bias="none", activation="relu2", hidden=(5, 4), image_size=3))
    assert mlp.orders == [4, 2, 1] and mlp.order == 7
    mlp1 = build_model(ModelSpec(name="mlp", bias="first", activation="relu", hidden=(5, 4), image_size=3))
    assert mlp1.orders == [1, 1, 1] and mlp1.order == 3
    cnn2 = build_model(ModelSpec(name="cnn", activation="relu2", width=0.125))
    assert cnn2.orders == [8, 4, 2, 1] and cnn2.order == 15
    vgg = build_model(ModelSpec(name="vgg16", width=1 / 16, image_size=32, in_channels=3))
    assert vgg.orders == [1] * 14 and vgg.order == 14
    vgg2 = build_model(ModelSpec(name="vgg16", width=1 / 16, image_size=32, in_channels=3, activation="relu2"))
    assert vgg2.orders == [2 ** (13 - i) for i in range(14)] and vgg2.order == 2 ** 14 - 1


def test_first_layer_bias_is_in_group_one():
    model = build_model(ModelSpec(name="mlp", bias="first", hidden=(5, 4), image_size=3))
    groups = model.layer_groups()
    assert len(groups) == 3
    assert [len(g) for g in groups] == [2, 1, 1]
    assert groups[0][1] is model.weight_layers[0].bias


@pytest.mark.parametrize("bias", ["none", "first", "all"])
def test_paper_cnn_layer_sizes(bias):
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="cnn", bias=bias, width=1.0))
    convs = [m for m in model.body if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.body if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 32, (5, 5)), (32, 64, (3, 3))]
    assert [c.padding for c in convs] == [(2, 2), (1, 1)]  # SAME
    assert [(f.in_features, f.out_features) for f in fcs] == [(64 * 7 * 7, 1024), (1024, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.body) == 2
    assert sum(isinstance(m, nn.ReLU) for m in model.body) == 3
    layers = convs + fcs
    expected_bias = {"none": [False] * 4, "first": [True, False, False, False], "all": [True] * 4}[bias]
    assert [m.bias is not None for m in layers] == expected_bias
    for m in layers:
        if m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0
    # He-normal: std sqrt(2 / fan_in) (the big fc layer has 3.2M weights: 1 % is many sigmas)
    fc1 = fcs[0].weight.detach()
    assert abs(float(fc1.std()) / math.sqrt(2 / fc1.shape[1]) - 1) < 0.01
    assert abs(float(fc1.mean())) < 1e-3 * math.sqrt(2 / fc1.shape[1]) * 10
    out = model(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert model.orders == [1, 1, 1, 1] and model.order == 4


def test_parameter_norms():
    torch.manual_seed(3)
    model = build_model(ModelSpec(name="mlp", bias="first", hidden=(7, 5), image_size=4))
    with torch.no_grad():
        model.weight_layers[0].bias.normal_()
    norms = parameter_norms(model)
    expected = [torch.cat([p.detach().double().flatten() for p in g]).norm().item() for g in model.layer_groups()]
    assert norms == pytest.approx(expected, rel=1e-14)
    # the bias counts in group 1
    w_only = model.weight_layers[0].weight.detach().double().norm().item()
    assert norms[0] > w_only * (1 + 1e-6)


@pytest.mark.parametrize("kwargs,word", [
    (dict(name="resnet"), "resnet"),
    (dict(bias="some"), "some"),
    (dict(activation="tanh"), "tanh"),
    (dict(width=0.0), "width"),
    (dict(width=-1.0), "width"),
    (dict(width=float("nan")), "width"),
    (dict(name="vgg16", image_size=28), "28"),
    (dict(name="cnn", image_size=3), "3"),
])
def test_bad_spec_raises_user_error(kwargs, word):
    with pytest.raises(UserError, match=word):
        build_model(ModelSpec(**kwargs))


def test_vgg16_layer_sizes():
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="vgg16", bias="first", in_channels=3, image_size=32))
    convs = [m for m in model.body if isinstance(m, nn.Conv2d)]
    expected = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert [c.out_channels for c in convs] == expected
    assert [c.in_channels for c in convs] == [3] + expected[:-1]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    fcs = [m for m in model.body if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(512, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.body) == 5
    assert [m.bias is not None for m in convs + fcs] == [True] + [False] * 13
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)
