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
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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


# ----------------------------------------------------------------------------- bounds over graphs
#
# `graph_bound` traces any nn.Module with torch.fx and bounds the L2 Lipschitz constant of x ↦ f(x) node by
# node: L(input) = 1, L = 0 for values that do not depend on the input (parameters, buffers, constants),
# L(op(a)) ≤ factor(op) · L(a) along compositions and L(a ± b) ≤ L(a) + L(b) at additions. A module is
# accepted only when every node is one whose factor is known; anything else is left out with a reason.
# Factors (all in L2, per sample):
#   Linear               σ_max(W) by a float64 SVD (exact up to rounding);
#   Conv2d (zeros pad)   a certified upper bound: embedded in a circular convolution on an M_h×M_w grid
#                        with M = input size + dilated kernel size − 1, the layer's output (any zero padding,
#                        stride or dilation) is a selection of the circular one's outputs, whose norm is the
#                        largest σ_max of the kernel's 2-D DFT over the grid's frequencies (per group); on
#                        small inputs (≤ DENSE_LIMIT matrix entries) the smaller of that and the exact norm
#                        of the layer as a dense matrix (float64 SVD);
#   BatchNorm (eval)     max_c |γ_c| / √(running_var_c + eps);
#   x · c, x / c         max |c|, 1 / min |c| for c independent of the input (input normalization);
#   ReLU, max(0, ·)      1; LeakyReLU: max(1, |slope|);
#   max-pool             √(max number of windows sharing an input): 1 for non-overlapping windows;
#   avg-pool, mean, sum  √(‖A‖₁‖A‖_∞), computed exactly from A·1 and Aᵀ·1 (A is linear with entries of one
#                        sign): 1/√(kh·kw) for non-overlapping full windows, the exact norm there;
#   flatten, view, reshape keeping the batch dimension, Dropout and Identity in eval mode: 1.
# Every computed factor (not an exact 1) is multiplied by (1 + ROUNDING) for float64 rounding. The bound
# describes the model in eval mode, the mode the attacks use; it is computed on a float64 copy of the
# model, a snapshot of its weights.

ROUNDING = 1e-9


@dataclass(frozen=True)
class BoundRow:
    """One operation of the graph: its Lipschitz factor and the bound from the input up to its output."""

    name: str
    kind: str
    factor: float  # nan for additions (their bound is the sum of their operands')
    bound: float


@dataclass
class GraphBound:
    """A Lipschitz bound of a traced module; `before_last` is the bound up to the last Linear's input
    (None when the output is not a Linear layer's)."""

    rows: list[BoundRow]
    total: float
    before_last: float | None
    input_shape: tuple[int, ...]
    net: nn.Module = field(repr=False)  # the float64 eval-mode copy the radii are evaluated on
    last_weight: torch.Tensor | None = field(default=None, repr=False)

    def table(self) -> list[dict[str, float | str]]:
        """One dict per row (name, kind, factor, bound); feed to pandas.DataFrame."""
        return [dict(name=r.name, kind=r.kind, factor=r.factor, bound=r.bound) for r in self.rows]

    def certified_radii(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000) -> torch.Tensor:
        """Certified L2 radius per sample (float64), 0 where misclassified; the semantics of `certified_radii`.

        With a last Linear layer W: r_n = min_{j≠y} (f_y − f_j)(x_n) / (‖w_y − w_j‖ · before_last);
        otherwise f_y − f_j = (e_y − e_j)·f is at most √2·total-Lipschitz. A single output (labels ±1) uses
        y·f over ‖w‖ · before_last, or over total."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise UserError(f"the bound was computed for inputs of shape {self.input_shape}, "
                            f"got {tuple(x.shape[1:])}")
        device = next(iter(self.net.state_dict().values()), x).device
        w = self.last_weight
        radii = []
        with torch.no_grad():
            for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
                yb = yb.to(device)
                f = _logits(self.net, xb.to(device, torch.float64))
                if f.ndim == 1:
                    r = yb.double() * f / (w.norm() * self.before_last if w is not None else self.total)
                else:
                    gap = f.gather(1, yb[:, None]) - f
                    scale = (torch.cdist(w, w)[yb] * self.before_last if w is not None
                             else torch.full_like(gap, math.sqrt(2) * self.total))
                    r = (gap / scale).scatter(1, yb[:, None], math.inf).amin(1)
                correct = sample_margins(f, yb) > 0
                radii.append(torch.where(correct, r, torch.zeros_like(r)))
        return torch.cat(radii) if radii else torch.zeros(0, dtype=torch.float64)


def circulant_conv_bound(weight: torch.Tensor, input_hw: Sequence[int], dilation: Sequence[int] = (1, 1),
                         groups: int = 1) -> float:
    """Certified upper bound on ‖A‖₂ of a zero-padded Conv2d's linear part on inputs of spatial size input_hw
    (any padding and stride): the norm of the circular convolution it embeds in (section note)."""
    w = weight.detach().double()
    c_out, c_in, kh, kw = w.shape
    ekh, ekw = (kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1
    grid = w.new_zeros(c_out, c_in, input_hw[0] + ekh - 1, input_hw[1] + ekw - 1)
    grid[:, :, :ekh:dilation[0], :ekw:dilation[1]] = w
    spectrum = torch.fft.rfft2(grid)  # the other half of the frequencies are complex conjugates
    spectrum = spectrum.reshape(groups, c_out // groups, c_in, *spectrum.shape[-2:]).permute(0, 3, 4, 1, 2)
    return float(torch.linalg.matrix_norm(spectrum, ord=2).max())


DENSE_LIMIT = 2 ** 22  # matrix entries up to which a convolution's norm is also computed exactly


def conv2d_operator_bound(conv: nn.Conv2d, input_shape: Sequence[int]) -> float:
    """Certified upper bound on ‖A‖₂ of a zero-padded Conv2d's linear part on inputs of shape (C, H, W):
    the circulant bound, or the exact norm of A as a dense matrix when that is smaller and A is small
    (the circulant bound is loose on small images, where the padding is a large part of the input)."""
    bound = circulant_conv_bound(conv.weight, input_shape[-2:], conv.dilation, conv.groups)
    n = math.prod(input_shape)
    weight = conv.weight.detach().double()
    apply = lambda v: F.conv2d(v, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)  # noqa: E731
    out = apply(torch.zeros(1, *input_shape, dtype=torch.float64, device=weight.device))
    if n * out.numel() <= DENSE_LIMIT:
        columns = apply(torch.eye(n, dtype=torch.float64, device=weight.device).reshape(n, *input_shape))
        bound = min(bound, float(torch.linalg.matrix_norm(columns.reshape(n, -1), ord=2)))
    return bound


def _pool_overlap(kernel, stride, dilation, dims: int) -> int:
    """The most windows of a pool that contain one input position: ∏ ⌈k·gcd(d, s)/s⌉ (1 when disjoint).

    Per dimension, window o holds position i when i − o·s = t·d for some t < k; the t that occur have one
    residue t·d mod s, which repeats every s/gcd(d, s) values of t."""
    def per_dim(v):
        return tuple(v) * (dims if len(v) == 1 else 1) if isinstance(v, (tuple, list)) else (v,) * dims

    k, d = per_dim(kernel), per_dim(dilation)
    s = per_dim(stride) if stride not in (None, [], ()) else k  # no stride: the kernel size
    return math.prod(-(-ki * math.gcd(di, si) // si) for ki, si, di in zip(k, s, d))


def _schur_bound(op: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> float:
    """√(‖A‖₁‖A‖_∞) for a linear A whose entries share one sign, on inputs shaped like `like`: row sums A·1,
    column sums Aᵀ·1 (exact)."""
    ones = torch.ones_like(like, dtype=torch.float64)
    rows, vjp = torch.func.vjp(op, ones)
    (cols,) = vjp(torch.ones_like(rows))
    return math.sqrt(float(rows.abs().max()) * float(cols.abs().max()))


_RELU = {F.relu, torch.relu, torch.relu_, "relu", "relu_"}
_ADD = {operator.add, operator.iadd, torch.add, "add"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul"}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "true_divide"}
_NEG = {operator.neg, torch.neg, "neg"}
_RESHAPE = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
_SHAPE = {"size", "dim"}
_AVG = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d,
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.mean, torch.sum, "mean", "sum"}
_MAXPOOL = {F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d}
_HOOKS = {"_forward_hooks": "forward", "_forward_pre_hooks": "forward-pre", "_backward_hooks": "backward",
          "_backward_pre_hooks": "backward-pre"}


def _hook_reason(model: nn.Module) -> str:
    """Why hooks or parametrizations keep the trace from seeing the computation ('' when none)."""
    from torch.nn.modules import module as torch_module
    from torch.nn.utils import parametrize

    for attr, what in _HOOKS.items():
        if getattr(torch_module, f"_global{attr}", None):
            return f"a global module {what} hook is registered, which the trace cannot see"
    for name, m in model.named_modules():
        where = f"module {name!r}" if name else "the model"
        for attr, what in _HOOKS.items():
            if getattr(m, attr, None):
                return f"{where} has a {what} hook, which the trace cannot see"
        if parametrize.is_parametrized(m):
            return f"{where} has a parametrization (torch.nn.utils.parametrize), which the trace does not follow"
        if "forward" in vars(m):
            return f"{where} has its forward replaced on the instance, which the trace cannot see"
    return ""


def _record(gm, x: torch.Tensor) -> tuple[object, dict]:
    """Run a GraphModule node by node: its output and every node's value."""
    from torch import fx

    values: dict = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            values[node] = super().run_node(node)
            return values[node]

    return Recorder(gm).run(x), values


def _call(gm, node, values, replace, v):
    """The node's operation evaluated with the value of node `replace` swapped for v."""
    from torch.fx.node import map_arg

    env = lambda n: v if n is replace else values[n]  # noqa: E731
    args, kwargs = map_arg(node.args, env), map_arg(node.kwargs, env)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _kwargs(gm, node) -> dict:
    pair = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    return dict(pair.kwargs) if pair is not None else {}


class _Refused(Exception):
    """A node the bound does not cover; its message is the one-line reason."""


def _bn_factor(m: nn.modules.batchnorm._BatchNorm) -> float:
    if m.running_var is None:
        raise _Refused(f"{type(m).__name__} without running statistics normalizes by batch statistics")
    gamma = m.weight.detach().double().abs() if m.weight is not None else torch.ones_like(m.running_var).double()
    return float((gamma / (m.running_var.double() + m.eps).sqrt()).max())


def _module_factor(gm, node, m: nn.Module, values, source) -> tuple[str, float]:
    kind = type(m)
    x = values[source]
    if kind is nn.Linear:
        return "linear", float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
    if kind is nn.Conv2d:
        if m.padding_mode != "zeros":
            raise _Refused(f"Conv2d {node.target!r} pads with {m.padding_mode!r} (only zero padding is bounded)")
        return "conv", conv2d_operator_bound(m, x.shape[1:])
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return "batchnorm", _bn_factor(m)
    if kind is nn.ReLU:
        return "relu", 1.0
    if kind is nn.LeakyReLU:
        factor = max(1.0, abs(m.negative_slope))
        if m.inplace and factor > 1:
            raise _Refused(f"in-place LeakyReLU {node.target!r} with slope {m.negative_slope} rescales its input")
        return "leaky_relu", factor
    if kind in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
        if m.return_indices:
            raise _Refused(f"{node.target!r} returns indices")
        return "max_pool", math.sqrt(_pool_overlap(m.kernel_size, m.stride, m.dilation, x.dim() - 2))
    if kind in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveAvgPool3d):
        return "avg_pool", _schur_bound(m, x)
    if kind is nn.Flatten:
        return "flatten", 1.0
    if kind in (nn.Identity, nn.Dropout):  # Dropout is the identity in eval mode
        return "identity", 1.0
    raise _Refused(f"unsupported layer {kind.__name__} ({node.target!r})")


def _function_factor(gm, node, values, source) -> tuple[str, float]:
    """(kind, factor) of a call_function / call_method node with one input-dependent operand `source`."""
    t = node.target
    name = getattr(t, "__name__", str(t))
    if t in _RELU:
        return "relu", 1.0
    if t in _NEG:
        return "neg", 1.0
    if t is F.leaky_relu:
        kw = _kwargs(gm, node)
        factor = max(1.0, abs(float(kw.get("negative_slope", 0.01))))
        if kw.get("inplace") and factor > 1:  # it would rescale the input for its other users too
            raise _Refused(f"in-place leaky_relu {node.name} with a slope above 1 rescales its input")
        return "leaky_relu", factor
    if t is F.dropout and not _kwargs(gm, node).get("training", True):
        return "identity", 1.0
    if t in _RESHAPE:
        return "flatten" if t in (torch.flatten, "flatten") else "view", 1.0
    if t in _AVG:
        return "avg_pool" if t not in (torch.mean, torch.sum, "mean", "sum") else name, _schur_bound(
            lambda v: _call(gm, node, values, source, v), values[source])
    if t in _MAXPOOL:
        kw = _kwargs(gm, node)
        if kw.get("return_indices"):
            raise _Refused(f"{node.name} returns indices")
        return "max_pool", math.sqrt(_pool_overlap(kw["kernel_size"], kw.get("stride"), kw.get("dilation", 1),
                                                   values[source].dim() - 2))
    if t is F.linear:
        if _kwargs(gm, node)["input"] is not source:
            raise _Refused(f"{node.name} has an input-dependent weight")
        return "linear", float(torch.linalg.matrix_norm(_linear_weight(gm, node, values), ord=2))
    raise _Refused(f"unsupported operation {name} (node {node.name})")


def _constant_value(node, values):
    return values[node] if hasattr(node, "op") else node


def _analyse(gm, values, batch: int) -> tuple[list[BoundRow], dict]:
    """Per-node bounds of a recorded graph: rows for the table and {node: L}."""
    L: dict = {}
    rows: list[BoundRow] = []
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            L[node] = 1.0
            continue
        if node.op == "output":
            continue
        inputs = [a for a in node.all_input_nodes if L.get(a, 0.0) != 0.0 or a.op == "placeholder"]
        if node.op == "get_attr" or not inputs:
            L[node] = 0.0  # does not depend on the input
            continue
        value = values[node]
        if node.target in _SHAPE or (node.target in (getattr, operator.getitem)
                                     and not isinstance(value, torch.Tensor)):
            L[node] = 0.0  # shapes, dtypes and the like: the same for every input
            continue
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
            raise _Refused(f"{node.name} does not keep one row per sample")
        t = node.target
        tensors = [a for a in (*node.args, *node.kwargs.values()) if hasattr(a, "op") and a in L]
        if node.op == "call_function" or node.op == "call_method":
            if t in _ADD or t in _SUB:
                a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["other"]
                alpha = abs(float(node.kwargs.get("alpha", 1)))
                bound = L.get(a, 0.0) + alpha * L.get(b, 0.0) if hasattr(b, "op") else L.get(a, 0.0)
                L[node] = bound
                rows.append(BoundRow(node.name, "add" if t in _ADD else "sub", math.nan, bound))
                continue
            if t in _MUL or t in _DIV:
                a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["other"]
                if "rounding_mode" in node.kwargs:
                    raise _Refused(f"{node.name} rounds")
                dep = [o for o in (a, b) if hasattr(o, "op") and L.get(o, 0.0) != 0.0]
                if len(dep) == 2:
                    raise _Refused(f"{node.name} multiplies two input-dependent values (no global Lipschitz constant)")
                if t in _DIV and dep[0] is not a:
                    raise _Refused(f"{node.name} divides by an input-dependent value")
                const = torch.as_tensor(_constant_value(b if dep[0] is a else a, values)).double().abs()
                if t in _DIV:
                    factor = math.inf if float(const.min()) == 0 else 1.0 / float(const.min())
                else:
                    factor = float(const.max())
                source, kind = dep[0], "scale"
            else:
                if len(inputs) != 1:
                    raise _Refused(f"{node.name} combines several input-dependent values")
                source = inputs[0]
                kind, factor = _function_factor(gm, node, values, source)
        elif node.op == "call_module":
            if len(inputs) != 1 or len(tensors) != 1:
                raise _Refused(f"{node.target!r} takes several tensors")
            source = inputs[0]
            kind, factor = _module_factor(gm, node, modules[node.target], values, source)
        else:
            raise _Refused(f"unsupported node {node.op} ({node.name})")
        if not math.isfinite(factor):
            raise _Refused(f"{node.name} has no finite Lipschitz factor")
        factor = factor if factor == 1.0 else factor * (1 + ROUNDING)  # 1 is exact
        L[node] = factor * L[source]
        name = node.target if node.op == "call_module" else node.name
        rows.append(BoundRow(name, kind, factor, L[node]))
    return rows, L


def _linear_weight(gm, node, values) -> torch.Tensor:
    """The float64 weight of a Linear call (module or F.linear)."""
    if node.op == "call_module":
        return gm.get_submodule(node.target).weight.detach().double()
    weight = _kwargs(gm, node)["weight"]
    return torch.as_tensor(_constant_value(weight, values)).detach().double()


def _last_linear(gm, out_node, values):
    """(input node, float64 weight) when the output is a Linear layer's, else (None, None)."""
    is_module = out_node.op == "call_module" and type(gm.get_submodule(out_node.target)) is nn.Linear
    if is_module or (out_node.op == "call_function" and out_node.target is F.linear):
        return (out_node.args[0] if is_module else _kwargs(gm, out_node)["input"]), _linear_weight(gm, out_node, values)
    return None, None


def graph_bound(model: nn.Module, x_probe: torch.Tensor) -> tuple[GraphBound | None, str]:
    """A Lipschitz bound of `model` (in eval mode) traced with torch.fx, or (None, one-line reason).

    `x_probe` (N ≥ 2 inputs) fixes the input shape; the traced graph must reproduce the module's outputs on
    it, sample by sample. The model itself is not modified."""
    from torch import fx

    if x_probe.dim() < 2 or len(x_probe) < 2:
        raise UserError("graph_bound needs a probe batch of at least 2 inputs")
    reason = _hook_reason(model)
    if reason:
        return None, reason
    try:
        net = copy.deepcopy(model).double().eval()
    except Exception as err:  # a module that cannot be copied
        return None, f"the module cannot be copied ({type(err).__name__})"
    try:
        gm = fx.symbolic_trace(net)
    except Exception as err:  # torch.fx refuses data-dependent control flow and more
        return None, f"torch.fx cannot trace the module ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None, "the module takes more than one input"
    device = next(iter(net.state_dict().values()), x_probe).device
    x = x_probe.detach().to(device, torch.float64)
    try:
        with torch.no_grad():
            out, values = _record(gm, x)
            direct = net(x)
    except Exception as err:
        return None, f"the traced module fails on the probe ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(x):
        return None, "the module's output is not one row of logits per sample"
    if out.shape[1] == 0:
        return None, "the module has no outputs"
    scale = float(out.abs().max())
    if not (isinstance(direct, torch.Tensor) and direct.shape == out.shape
            and float((out - direct).abs().max()) <= 1e-9 * (1 + scale)):
        return None, "the traced graph does not reproduce the module's outputs"
    try:
        rows, L = _analyse(gm, values, len(x))
        with torch.no_grad():
            alone = gm(x[:1])
    except _Refused as err:
        return None, str(err)
    except Exception as err:  # an operation whose arguments we could not read
        return None, f"the graph could not be analysed ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    if float((alone - out[:1]).abs().max()) > 1e-9 * (1 + scale):
        return None, "the module's output for one sample depends on the other samples in the batch"
    out_node = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    source, weight = _last_linear(gm, out_node, values)
    before = L.get(source, 0.0) if source is not None else None
    return GraphBound(rows=rows, total=L.get(out_node, 0.0), before_last=before,
                      input_shape=tuple(x_probe.shape[1:]), net=gm, last_weight=weight), ""
