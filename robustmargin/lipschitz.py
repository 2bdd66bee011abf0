"""Lipschitz constants, certified radii and local estimates (SCIENCE.md §7).

σ_i is the spectral norm of weight layer i's LINEAR operator on its actual input: for a convolution
that is the convolution operator with its padding and stride, not the reshaped kernel matrix. Biases
are ignored, since an affine map has the Lipschitz constant of its linear part. ReLU, Flatten and
non-overlapping max-pooling are 1-Lipschitz in L2, so ∏σ_i bounds the network's Lipschitz constant.
A non-overlapping average-pool scales L2 norms by at most 1/√(window area) (Cauchy–Schwarz per window;
at most 1 with padding or ceil_mode): that factor is folded into σ of the weight layer before it.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustmargin.errors import UserError
from robustmargin.margins import sample_margins
from robustmargin.models import HomogeneousNet, parameter_norms

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)


def layer_input_shapes(model: HomogeneousNet, input_shape: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Per-sample input shape of every weight layer, found by running a dummy input through model.body.

    `input_shape` (C, H, W) defaults to the model's `input_shape` attribute if it has one, else its spec."""
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None) or (
            model.spec.in_channels, model.spec.image_size, model.spec.image_size)
    param = next(model.parameters())
    h = torch.zeros((1, *input_shape), dtype=param.dtype, device=param.device)
    shapes = []
    with torch.no_grad():
        for module in model.body:
            if isinstance(module, WEIGHT_LAYERS):
                shapes.append(tuple(h.shape[1:]))
            h = module(h)
    return shapes


def _linear_part(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's map without its bias, in float64."""
    weight = layer.weight.detach().double()
    if isinstance(layer, nn.Linear):
        return lambda v: F.linear(v, weight)
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise UserError(f"spectral norm of a convolution with padding_mode={layer.padding_mode!r} is not supported")
        return lambda v: F.conv2d(v, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    raise UserError(f"no spectral norm for layer type {type(layer).__name__}")


def operator_norm(layer: nn.Module, input_shape: Sequence[int], *, iters: int = 5000, tol: float = 1e-6,
                  block: int = 8, seed: int = 0) -> float:
    """σ = ||A||_2 of the layer's linear part A on inputs of shape `input_shape`, by block power iteration.

    Power (subspace) iteration on AᵀA with `block` vectors and a Rayleigh–Ritz step; block = 1 is plain
    power iteration. The block converges at rate λ_{block+1}/λ_1 rather than λ_2/λ_1, which matters for
    convolutions, whose top singular values cluster. Aᵀ is the vector-Jacobian product of A (exact: A is
    linear). Iteration stops when the eigen-residual r = ||AᵀAv − μv|| of the top Ritz pair (μ, v) is at
    most tol·μ. Ritz values approach λ_1 = σ² from below (μ ≤ σ² always), so we return √(μ + r): at least
    the singular value nearest √μ (Bauer–Fike for symmetric matrices), which from a random start is the
    top one, and at most √μ·(1 + tol/2). Treat it as an estimate converged to relative tolerance tol/2.
    """
    op = _linear_part(layer)
    n = math.prod(input_shape)
    b = min(block, n)
    gen = torch.Generator().manual_seed(seed)
    v = torch.linalg.qr(torch.randn(n, b, generator=gen, dtype=torch.float64)).Q.to(layer.weight.device)
    batch = lambda m: m.T.reshape(b, *input_shape)  # columns of an (n, b) matrix as a batch of inputs
    _, vjp = torch.func.vjp(op, batch(v))  # A is linear: its vjp at any point is Aᵀ
    mu = r = torch.zeros((), dtype=torch.float64)
    for _ in range(iters):
        w = vjp(op(batch(v)))[0].reshape(b, n).T  # AᵀA V
        evals, evecs = torch.linalg.eigh((v.T @ w + w.T @ v) / 2)  # Rayleigh–Ritz on span(V)
        mu, u = evals[-1], evecs[:, -1]
        r = (w @ u - mu * (v @ u)).norm()
        if r <= tol * mu or mu <= 0:
            break
        v = torch.linalg.qr(w).Q
    else:
        warnings.warn(f"power iteration on {type(layer).__name__} did not reach tol={tol} in {iters} iterations "
                      f"(relative residual {float(r / mu):.2e})", RuntimeWarning, stacklevel=2)
    return math.sqrt(max(float(mu + r), 0.0))


def layer_spectral_norms(model: HomogeneousNet, *, iters: int = 5000, tol: float = 1e-6, block: int = 8,
                         seed: int = 0, input_shape: Sequence[int] | None = None) -> list[float]:
    """σ_i of every weight layer's linear operator, in order (see `operator_norm`), times the factor of
    any average-pool between it and the next weight layer."""
    shapes = layer_input_shapes(model, input_shape)
    sigmas = [operator_norm(layer, shape, iters=iters, tol=tol, block=block, seed=seed)
              for layer, shape in zip(model.weight_layers, shapes)]
    i = -1
    for module in model.body:
        if isinstance(module, WEIGHT_LAYERS):
            i += 1
        elif isinstance(module, nn.AvgPool2d) and i >= 0:  # before the first layer: counted as 1, still a bound
            sigmas[i] *= avg_pool_factor(module)
    return sigmas


def _pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
    return v if isinstance(v, tuple) else (v, v)


def _disjoint(module: nn.MaxPool2d | nn.AvgPool2d) -> bool:
    k, s = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
    dilation = _pair(getattr(module, "dilation", 1))
    return all((ki - 1) * di + 1 <= si for ki, si, di in zip(k, s, dilation))


def avg_pool_factor(module: nn.AvgPool2d) -> float:
    """L2 Lipschitz constant bound of a non-overlapping average-pool: 1/√(kh·kw) when every window is
    full (no padding, no ceil_mode), else 1 (a partial window averages fewer values)."""
    if module.padding not in (0, (0, 0)) or module.ceil_mode or module.divisor_override is not None:
        return 1.0
    return 1.0 / math.sqrt(math.prod(_pair(module.kernel_size)))


def check_one_lipschitz_between_layers(model: HomogeneousNet) -> None:
    """Raise UserError unless every non-weight module is 1-Lipschitz in L2 (ReLU, Flatten, non-overlapping max-pool)."""
    for module in model.body:
        if isinstance(module, (*WEIGHT_LAYERS, nn.ReLU, nn.Flatten)):
            continue
        if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            if _disjoint(module) and (isinstance(module, nn.MaxPool2d) or module.divisor_override is None):
                continue  # windows are disjoint: ||pool(a) − pool(b)|| ≤ ||a − b||
            raise UserError(f"{type(module).__name__} with kernel {module.kernel_size} and stride {module.stride} "
                            "has overlapping windows: the product bound does not apply")
        raise UserError(f"{type(module).__name__} has no global Lipschitz constant here (e.g. squared ReLU): "
                        "no product bound or certified radius")


def lipschitz_bound(sigmas: Sequence[float], model: HomogeneousNet | None = None) -> float:
    """∏σ_i, an upper bound on the L2 Lipschitz constant of x ↦ f(x); pass `model` to check that it applies."""
    if model is not None:
        check_one_lipschitz_between_layers(model)
    return math.prod(sigmas)


def _float64_copy(model: HomogeneousNet) -> HomogeneousNet:
    return copy.deepcopy(model).double().eval()


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits, with a single-output model's (N, 1) squeezed to (N,) (labels ±1, q = y·f)."""
    out = model(x)
    return out[:, 0] if out.shape[1] == 1 else out


def certified_radii(model: HomogeneousNet, x: torch.Tensor, y: torch.Tensor, sigmas: Sequence[float] | None = None,
                    *, batch_size: int = 1000) -> torch.Tensor:
    """r_n = min_{j≠y} (f_y − f_j)(x_n) / (||W_L[y] − W_L[j]||_2 ∏_{i<L} σ_i), 0 where misclassified (float64).

    f_y − f_j = (W_L[y] − W_L[j])·g(x) + const with g the network below the last layer, Lipschitz ≤ ∏_{i<L} σ_i,
    so no perturbation shorter than r_n can change the prediction: r_n is a certified lower bound on the
    minimal L2 adversarial distance (box or not), and r_n ≥ q_n / (√2 ∏σ_i). Evaluated in float64.
    """
    check_one_lipschitz_between_layers(model)
    last = model.weight_layers[-1]
    if not isinstance(last, nn.Linear) or model.body[-1] is not last:
        raise UserError("certified radii need a network that ends with its Linear last layer")
    if sigmas is None:
        sigmas = layer_spectral_norms(model)
    if len(sigmas) != len(model.weight_layers):
        raise UserError(f"got {len(sigmas)} spectral norms for {len(model.weight_layers)} weight layers")
    below = math.prod(sigmas[:-1])
    net = _float64_copy(model)
    w = net.weight_layers[-1].weight.detach()
    row_dist = torch.cdist(w, w)  # ||W_L[i] − W_L[j]||
    radii = []
    with torch.no_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            yb = yb.to(w.device)
            f = _logits(net, xb.to(w.device, torch.float64))
            if f.ndim == 1:  # one output, labels ±1: the "difference row" is ±w
                r = yb.double() * f / (w.norm() * below)
            else:
                gap = f.gather(1, yb[:, None]) - f
                ratio = gap / (row_dist[yb] * below)
                r = ratio.scatter(1, yb[:, None], math.inf).amin(1)
            correct = sample_margins(f, yb) > 0
            radii.append(torch.where(correct, r, torch.zeros_like(r)))
    return torch.cat(radii)


def _margin_and_gradient_norm(model: HomogeneousNet, x: torch.Tensor, y: torch.Tensor,
                              batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    net = _float64_copy(model)
    device = next(net.parameters()).device
    qs, norms = [], []
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        xb = xb.to(device, torch.float64).requires_grad_(True)
        q = sample_margins(_logits(net, xb), yb.to(device))
        (g,) = torch.autograd.grad(q.sum(), xb)  # samples are independent, so this is per-sample ∇_x q_n
        qs.append(q.detach())
        norms.append(g.flatten(1).norm(dim=1))
    return torch.cat(qs), torch.cat(norms)


def local_lipschitz_estimates(model: HomogeneousNet, x: torch.Tensor, y: torch.Tensor, *,
                              batch_size: int = 500) -> torch.Tensor:
    """||∇_x q_n(x_n)||_2 per sample (float64): the margin's local slope at x_n, an ESTIMATE, not a bound."""
    return _margin_and_gradient_norm(model, x, y, batch_size)[1]


def first_order_distance_estimates(model: HomogeneousNet, x: torch.Tensor, y: torch.Tensor, *,
                                   batch_size: int = 500) -> torch.Tensor:
    """q_n / ||∇_x q_n||: distance to the linearised decision boundary, 0 where misclassified. An ESTIMATE
    (exact for a linear binary model); neither a lower nor an upper bound on the true distance in general."""
    q, g = _margin_and_gradient_norm(model, x, y, batch_size)
    return torch.where(q > 0, q / g, torch.zeros_like(q))


def layer_table(model: HomogeneousNet, sigmas: Sequence[float] | None = None) -> list[dict[str, float | int | str]]:
    """One row per weight layer: layer (1-based), kind, sigma (σ_i), rho (ρ_i, Frobenius norm of the group,
    bias included), order (a_i). Feed to pandas.DataFrame."""
    if sigmas is None:
        sigmas = layer_spectral_norms(model)
    return [{"layer": i + 1, "kind": "conv" if isinstance(m, nn.Conv2d) else "linear",
             "sigma": float(s), "rho": r, "order": a}
            for i, (m, s, r, a) in enumerate(zip(model.weight_layers, sigmas, parameter_norms(model), model.orders))]
