"""graph_bound: a Lipschitz bound over torch.fx graphs, checked against measurements it must never beat.

The harness draws small random models from every kind of operation the tracer accepts; on each, the
bound must be at least every finite-difference quotient and Jacobian norm measured, and no certified
radius may exceed the distance of an adversarial example an attack found. Models that hide computation
from the trace (hooks, parametrizations) or use padding the bound does not cover must be refused.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from robustmargin.attacks import minimal_distances
from robustmargin.errors import UserError
from robustmargin.lipschitz import (ROUNDING, _pool_overlap, certified_radii, circulant_conv_bound,
                                    conv2d_operator_bound, graph_bound, layer_spectral_norms)
from robustmargin.models import ModelSpec, build_model
from test_attack_oracle import make_problem

CLASSES = 3
HARNESS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- model kinds

class Normalize(nn.Module):
    """(x − mean) / std per channel, from buffers or from plain Python numbers."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, buffers: bool):
        super().__init__()
        if buffers:
            self.register_buffer("mean", mean.view(1, -1, 1, 1))
            self.register_buffer("std", std.view(1, -1, 1, 1))
        else:
            self.mean, self.std = float(mean[0]), float(std[0])

    def forward(self, x):
        return (x - self.mean) / self.std


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class ViewFlatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class TorchFlatten(nn.Module):
    def forward(self, x):
        return torch.flatten(x, 1)


class FunctionalPools(nn.Module):
    """Pools called as functions, with keyword arguments (defect 3's form)."""

    def __init__(self, kind: str, kernel: int, stride: int):
        super().__init__()
        self.kind, self.kernel, self.stride = kind, kernel, stride

    def forward(self, x):
        if self.kind == "avg":
            return F.avg_pool2d(input=x, kernel_size=self.kernel, stride=self.stride)
        return F.max_pool2d(x, kernel_size=self.kernel, stride=self.stride)


class Drawn(nn.Module):
    """features → last Linear, optionally scaled afterwards (then the output is not a Linear's)."""

    def __init__(self, features: nn.Sequential, last: nn.Linear, out_scale: float | None):
        super().__init__()
        self.features, self.last, self.out_scale = features, last, out_scale

    def forward(self, x):
        out = self.last(self.features(x))
        return out if self.out_scale is None else out * self.out_scale


OPS = st.one_of(
    st.tuples(st.just("conv"), st.integers(1, 3), st.sampled_from([1, 2, 3]), st.sampled_from([1, 2]),
              st.integers(0, 2), st.sampled_from([1, 2])),  # out channels, kernel, stride, padding, dilation
    st.tuples(st.just("bn")), st.tuples(st.just("relu")),
    st.tuples(st.just("leaky"), st.sampled_from([0.01, 0.2, -0.5, 1.5, 3.0])),
    st.tuples(st.just("res"), st.booleans()),  # with BatchNorm inside
    st.tuples(st.just("avg"), st.sampled_from([2, 3]), st.sampled_from([1, 2, 3]), st.integers(0, 1),
              st.booleans(), st.booleans()),  # kernel, stride, padding, ceil_mode, count_include_pad
    st.tuples(st.just("max"), st.sampled_from([2, 3]), st.sampled_from([1, 2, 3]), st.integers(0, 1),
              st.sampled_from([1, 2]), st.booleans()),  # kernel, stride, padding, dilation, ceil_mode
    st.tuples(st.just("fpool"), st.sampled_from(["avg", "max"]), st.sampled_from([2, 3]), st.sampled_from([1, 2])),
)

RECIPES = st.fixed_dictionaries(dict(
    channels=st.sampled_from([1, 2]), size=st.sampled_from([4, 5, 6, 8]),
    normalize=st.sampled_from([None, "buffers", "constants"]), ops=st.lists(OPS, min_size=1, max_size=4),
    flatten=st.sampled_from(["module", "view", "function"]), hidden=st.sampled_from([None, "relu", "leaky"]),
    out_scale=st.sampled_from([None, None, 0.5, -2.0]), seed=st.integers(0, 2 ** 16)))


def random_bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.uniform_(-2.0, 2.0)
        bn.bias.normal_()
    return bn


def make_layer(op: tuple, c: int) -> nn.Module:
    kind = op[0]
    if kind == "conv":
        _, c_out, k, s, p, d = op
        return nn.Conv2d(c, c_out, k, stride=s, padding=p, dilation=d)
    if kind == "bn":
        return random_bn(c)
    if kind == "relu":
        return nn.ReLU()
    if kind == "leaky":
        return nn.LeakyReLU(op[1])
    if kind == "res":
        body = [nn.Conv2d(c, c, 3, padding=1)] + ([random_bn(c)] if op[1] else [])
        return Residual(nn.Sequential(*body, nn.ReLU(), nn.Conv2d(c, c, 1)))
    if kind == "avg":
        _, k, s, p, ceil, include = op
        return nn.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=include)
    if kind == "max":
        _, k, s, p, d, ceil = op
        return nn.MaxPool2d(k, s, p, dilation=d, ceil_mode=ceil)
    return FunctionalPools(*op[1:])


def build(recipe: dict) -> tuple[nn.Module, tuple[int, int, int]]:
    """The model a recipe describes (weights from its seed, eval mode) and its input shape. An operation
    that does not fit the shape reached so far is skipped."""
    torch.manual_seed(recipe["seed"])
    shape = (recipe["channels"], recipe["size"], recipe["size"])
    c = shape[0]
    layers: list[nn.Module] = []
    if recipe["normalize"]:
        layers.append(Normalize(torch.rand(c), 0.2 + torch.rand(c), buffers=recipe["normalize"] == "buffers"))
    h = torch.zeros(2, *shape)
    for op in recipe["ops"]:
        layer = make_layer(op, h.shape[1]).eval()
        try:
            with torch.no_grad():
                out = layer(h)
        except RuntimeError:  # does not fit (kernel larger than the input, padding over half the kernel)
            continue
        if out.numel() and out.shape[-1] >= 1:
            layers.append(layer)
            h = out
    flatten = {"module": nn.Flatten(), "view": ViewFlatten(), "function": TorchFlatten()}[recipe["flatten"]]
    layers.append(flatten)
    n = h[0].numel()
    if recipe["hidden"]:
        layers += [nn.Linear(n, 6), nn.ReLU() if recipe["hidden"] == "relu" else nn.LeakyReLU(0.3)]
        n = 6
    model = Drawn(nn.Sequential(*layers), nn.Linear(n, CLASSES), recipe["out_scale"]).eval()
    return model, shape


def reference(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


def largest_quotient(f, shape, *, pairs: int = 48, seed: int = 0) -> float:
    """The largest ||f(a) − f(b)|| / ||a − b|| over random pairs in the box and close pairs (float64),
    and the largest Jacobian spectral norm at random points."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(pairs, *shape, generator=gen, dtype=torch.float64)
    far = torch.rand(pairs, *shape, generator=gen, dtype=torch.float64)
    step = torch.randn(pairs, *shape, generator=gen, dtype=torch.float64)
    near = a + 1e-4 * step / step.flatten(1).norm(dim=1).view(-1, *[1] * len(shape))
    with torch.no_grad():
        fa = f(a)
        quotients = [(fa - f(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1) for b in (far, near)]
    jacobians = [torch.autograd.functional.jacobian(lambda v: f(v[None])[0], p) for p in a[:12]]
    jac_norms = torch.stack([torch.linalg.matrix_norm(j.reshape(len(j), -1), ord=2) for j in jacobians])
    return float(torch.cat([*quotients, jac_norms]).max())


def probe(shape, n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the soundness harness

@settings(max_examples=40, **HARNESS)
@given(RECIPES)
def test_bound_is_at_least_every_measured_quotient(recipe):
    model, shape = build(recipe)
    bound, reason = graph_bound(model, probe(shape))
    assert bound is not None, f"a model of accepted kinds was refused: {reason}"
    ref = reference(model)
    assert largest_quotient(ref, shape) <= bound.total * (1 + 1e-9)
    if recipe["out_scale"] is None:
        assert bound.before_last is not None
        assert largest_quotient(ref.features, shape) <= bound.before_last * (1 + 1e-9)
    else:
        assert bound.before_last is None  # the output is a scaled Linear: the √2·total form applies


@settings(max_examples=8, **HARNESS)
@given(RECIPES)
def test_no_certified_radius_exceeds_an_attack_distance(recipe):
    model, shape = build(recipe)
    x = probe(shape, n=5, seed=2)
    bound, reason = graph_bound(model, probe(shape))
    assert bound is not None, reason
    with torch.no_grad():
        y = model(x).argmax(1)
    found = minimal_distances(model, x, y, attack=["ddn", "fmn"], ddn={"steps": 100, "restarts": 4},
                              fmn={"steps": 100, "restarts": 4})
    radii = bound.certified_radii(x, y)
    assert bool((radii > 0).all()), "every point is classified as labelled"
    assert bool((radii <= found * (1 + 1e-4) + 1e-7).all()), (radii, found)


DEFECTS = ["forward hook", "forward-pre hook", "backward hook", "global hook", "parametrization",
           "reflect", "circular", "replicate"]


class Twice(nn.Module):
    def forward(self, w):
        return 2 * w


@settings(max_examples=24, **HARNESS)
@given(RECIPES, st.sampled_from(DEFECTS), st.integers(0, 100))
def test_models_hiding_computation_are_refused(recipe, defect, pick):
    model, shape = build(recipe)
    if defect in ("reflect", "circular", "replicate"):
        model.features.insert(0, nn.Conv2d(shape[0], shape[0], 3, padding=1, padding_mode=defect))
        expected = defect
    elif defect == "parametrization":
        weighted = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        parametrize.register_parametrization(weighted[pick % len(weighted)], "weight", Twice())
        expected = "parametrization"
    else:
        modules = list(model.modules())
        target = modules[pick % len(modules)]
        expected = defect
        if defect == "forward hook":
            target.register_forward_hook(lambda m, args, out: 2 * out if isinstance(out, torch.Tensor) else out)
        elif defect == "forward-pre hook":
            target.register_forward_pre_hook(lambda m, args: tuple(2 * a for a in args))
        elif defect == "backward hook":
            target.register_full_backward_hook(lambda m, grad_in, grad_out: None)
        else:
            expected = "global module forward hook"
    if defect == "global hook":
        handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: out)
        try:
            bound, reason = graph_bound(model, probe(shape))
        finally:
            handle.remove()
    else:
        bound, reason = graph_bound(model, probe(shape))
    assert bound is None and expected in reason, reason
    assert "\n" not in reason


# ----------------------------------------------------------------------------- operator factors

def dense_norm(op, shape) -> float:
    """‖A‖₂ of a linear map on inputs of `shape`, from its matrix on the identity basis (float64)."""
    n = math.prod(shape)
    with torch.no_grad():
        columns = op(torch.eye(n, dtype=torch.float64).reshape(n, *shape))
    return float(torch.linalg.matrix_norm(columns.reshape(n, -1), ord=2))


CONVS = [((3, 4, 3), dict(padding=1), (3, 7, 7)), ((2, 5, 5), dict(padding=2, dilation=2), (2, 9, 9)),
         ((4, 3, 3), dict(stride=2), (4, 9, 8)), ((4, 6, 3), dict(padding=1, groups=2), (4, 6, 6)),
         ((1, 6, 5), dict(padding="same"), (1, 10, 10)), ((2, 2, 3), dict(padding=1, stride=2, dilation=2), (2, 5, 7))]


@pytest.mark.parametrize("args,kwargs,shape", CONVS)
def test_conv_bounds_are_upper_bounds(args, kwargs, shape):
    torch.manual_seed(0)
    conv = nn.Conv2d(*args, bias=False, **kwargs).double()
    exact = dense_norm(conv, shape)
    assert circulant_conv_bound(conv.weight, shape[1:], conv.dilation, conv.groups) >= exact * (1 - 1e-12)
    assert conv2d_operator_bound(conv, shape) == pytest.approx(exact, rel=1e-12)  # small: dense and exact


def test_circulant_bound_is_tight_on_large_images(monkeypatch):
    """Above DENSE_LIMIT only the circulant bound is used; on a 28×28 image it is within 2 % of the norm
    (power iteration from below)."""
    from robustmargin import lipschitz
    from robustmargin.lipschitz import operator_norm

    monkeypatch.setattr(lipschitz, "DENSE_LIMIT", 0)
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    estimate = operator_norm(conv, (2, 28, 28))
    bound = conv2d_operator_bound(conv, (2, 28, 28))
    assert estimate * (1 - 1e-6) <= bound <= 1.02 * estimate


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(2, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 2), (2, 1, 0, 2),
                                                            (3, 3, 0, 1), (3, 2, 0, 1)])
def test_pool_overlap_counts_windows(kernel, stride, padding, dilation):
    ones = torch.ones(1, 1, 9, 9)
    cols = F.unfold(ones, kernel, dilation=dilation, padding=padding, stride=stride)
    counts = F.fold(cols, (9, 9), kernel, dilation=dilation, padding=padding, stride=stride)  # windows per pixel
    assert _pool_overlap(kernel, stride, dilation, 2) >= int(counts.max())
    if (9 + 2 * padding - dilation * (kernel - 1) - 1) % stride == 0:  # every window position is used
        assert _pool_overlap(kernel, stride, dilation, 2) == int(counts.max())


@pytest.mark.parametrize("pool,shape", [(nn.AvgPool2d(2), (2, 6, 6)), (nn.AvgPool2d(3, 1, 1), (1, 5, 5)),
                                        (nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), (1, 6, 6)),
                                        (nn.AdaptiveAvgPool2d(2), (1, 5, 5))])
def test_avg_pool_factor_is_an_upper_bound(pool, shape):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = pool

        def forward(self, x):
            return self.pool(x).flatten(1)

    bound, reason = graph_bound(Net(), probe(shape))
    factor = bound.rows[0].factor
    exact = dense_norm(pool, shape)
    assert factor >= exact * (1 - 1e-12)
    if pool.__class__ is nn.AvgPool2d and pool.kernel_size == 2:
        assert factor == pytest.approx(0.5, rel=1e-8) == pytest.approx(exact, rel=1e-8)


def test_bound_and_radii_are_exact_for_a_linear_model():
    """f(x) = Wx with orthogonal equal-norm rows (test_attack_oracle): the bound is σ(W), reached by the
    Jacobian, and the certified radius is the exact minimal distance."""
    model, x, y, exact = make_problem()
    bound, reason = graph_bound(model, x)
    sigma = float(torch.linalg.matrix_norm(model[1].weight.detach().double(), ord=2))
    assert bound.total == pytest.approx(sigma, rel=1e-8)
    assert largest_quotient(reference(model), x.shape[1:]) == pytest.approx(sigma, rel=1e-6)
    assert torch.allclose(bound.certified_radii(x, y), exact, rtol=1e-6)


def test_chain_models_agree_with_the_product_bound():
    torch.manual_seed(0)
    mlp = build_model(ModelSpec(name="mlp", width=0.05, image_size=8, bias="all"))
    x = torch.rand(12, 1, 8, 8)
    bound, reason = graph_bound(mlp, x)
    assert bound is not None, reason
    y = mlp(x).argmax(1)
    assert torch.allclose(bound.certified_radii(x, y), certified_radii(mlp, x, y), rtol=1e-5)
    cnn = build_model(ModelSpec(name="cnn", width=0.25, image_size=12))
    bound, reason = graph_bound(cnn, torch.rand(4, 1, 12, 12))
    sigmas = layer_spectral_norms(cnn)
    assert math.prod(sigmas) * (1 - 1e-5) <= bound.total <= 1.1 * math.prod(sigmas)
    assert [r.kind for r in bound.rows if r.kind in ("conv", "linear")] == [
        "conv" if isinstance(m, nn.Conv2d) else "linear" for m in cnn.weight_layers]


def test_batchnorm_and_normalization_factors():
    torch.manual_seed(0)
    bn = random_bn(3).eval()
    model = nn.Sequential(Normalize(torch.rand(3), torch.tensor([0.5, 0.25, 2.0]), buffers=True), bn, nn.Flatten())
    bound, reason = graph_bound(model, probe((3, 2, 2)))
    factors = {r.kind: r.factor for r in bound.rows}
    assert factors["scale"] == pytest.approx(4.0 * (1 + ROUNDING))
    expected = float((bn.weight.detach().abs() / (bn.running_var + bn.eps).sqrt()).max())
    assert factors["batchnorm"] == pytest.approx(expected, rel=1e-6)


def test_squared_activations_products_and_batch_statistics_are_refused():
    squared = build_model(ModelSpec(name="mlp", width=0.05, image_size=4, activation="relu2"))
    assert "square" in graph_bound(squared, probe((1, 4, 4)))[1]

    class Product(nn.Module):
        def forward(self, x):
            return x.flatten(1) * x.flatten(1)

    assert "multiplies two input-dependent" in graph_bound(Product(), probe((1, 2, 2)))[1]
    batch_stats = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    assert "batch statistics" in graph_bound(batch_stats, probe((1, 2, 2)))[1]

    class InPlaceLeaky(nn.Module):
        def forward(self, x):
            x = x.flatten(1)
            y = F.leaky_relu(x, 2.0, inplace=True)  # x itself becomes leaky(x), up to 2x as steep
            return y + x

    assert "in-place" in graph_bound(InPlaceLeaky(), probe((1, 2, 2)))[1]

    class BatchMean(nn.Module):
        def forward(self, x):
            return x.flatten(1) - x.flatten(1).mean(0)

    assert graph_bound(BatchMean(), probe((1, 2, 2)))[0] is None


def test_graph_bound_leaves_the_model_as_it_was_and_checks_shapes():
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    model[1].eval()
    before = copy.deepcopy(model.state_dict())
    bound, reason = graph_bound(model, probe((1, 2, 2)))
    assert bound is not None, reason
    assert [m.training for m in model.modules()] == [True, True, False, True, True]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(UserError, match="shape"):
        bound.certified_radii(torch.rand(2, 1, 3, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(UserError, match="at least 2"):
        graph_bound(model, torch.rand(1, 1, 2, 2))


# ----------------------------------------------------------------------------- regressions

def normalized_mlp(hook: bool) -> nn.Module:
    """An MLP on 1×6×6 inputs normalized by (x − 0.1307) / 0.05: in a forward-pre hook on the first Linear
    (invisible to torch.fx) or in the forward itself."""
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, CLASSES))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            x = x.flatten(1)
            return self.layers(x if hook else (x - 0.1307) / 0.05)

    net = Net().eval()
    if hook:
        layers[0].register_forward_pre_hook(lambda m, args: ((args[0] - 0.1307) / 0.05,))
    return net


def test_hooked_layers_are_refused_and_their_traceable_twin_is_sound():
    """Defect 1: σ taken from the weights alone, the hook's 1/0.05 was missed and a certificate exceeded
    a real adversarial distance."""
    x = probe((1, 6, 6), n=8, seed=3)
    hooked, twin = normalized_mlp(True), normalized_mlp(False)
    with torch.no_grad():
        assert torch.allclose(hooked(x), twin(x))
        y = twin(x).argmax(1)
    bound, reason = graph_bound(hooked, x)
    assert bound is None and "forward-pre hook" in reason
    bound, reason = graph_bound(twin, x)
    found = minimal_distances(twin, x, y, attack="ddn", steps=200, restarts=3)
    weights_only = math.prod(float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
                             for m in twin.layers if isinstance(m, nn.Linear))
    assert bound.total == pytest.approx(weights_only / 0.05, rel=1e-6)
    assert bool((bound.certified_radii(x, y) <= found * (1 + 1e-4)).all())

    scaled = normalized_mlp(False)
    scaled.layers[2].register_forward_hook(lambda m, args, out: 20 * out)
    bound, reason = graph_bound(scaled, x)
    assert bound is None and "forward hook" in reason


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_unbounded_padding_is_a_reason_not_an_error(mode):
    """Defect 2."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode=mode), nn.Flatten(), nn.Linear(32, 2))
    bound, reason = graph_bound(model, probe((1, 4, 4)))
    assert bound is None and mode in reason


def test_functional_avg_pool_with_keywords():
    """Defect 3: F.avg_pool2d(input=..., kernel_size=2) crashed the tracer."""
    model = nn.Sequential(FunctionalPools("avg", 2, 2), nn.Flatten(), nn.Linear(8, 2))
    bound, reason = graph_bound(model, probe((2, 4, 4)))
    assert bound is not None, reason
    assert bound.rows[0].kind == "avg_pool" and bound.rows[0].factor == pytest.approx(0.5, rel=1e-8)
    assert largest_quotient(reference(model), (2, 4, 4)) <= bound.total


def test_models_without_parameters():
    """Defect 4: a model without parameters crashed on an empty list of parameters."""
    x = probe((1, 2, 2))
    model = nn.Sequential(Normalize(torch.tensor([0.5]), torch.tensor([0.25]), buffers=True), nn.Flatten())
    bound, reason = graph_bound(model, x)
    assert bound.total == pytest.approx(4.0, rel=1e-8) and bound.before_last is None
    y = model(x).argmax(1)
    radii = bound.certified_radii(x, y)
    gap = model(x).sort(1).values
    assert torch.allclose(radii, ((gap[:, -1] - gap[:, -2]) / (math.sqrt(2) * 4.0)).double(), rtol=1e-6)
    bound, reason = graph_bound(nn.Flatten(), x)
    assert bound.total == 1.0 and bound.rows[0].kind == "flatten"
