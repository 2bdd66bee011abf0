"""Exact minimal L2 adversarial distances of small fully connected ReLU networks (a test oracle).

Inside one activation pattern (which hidden units are on) the network is affine and its region is a
polyhedron, so the nearest point of that region, inside the box [0,1]^d, where one wrong class j
beats the label y is the projection of x onto a polyhedron: a convex QP. The exact minimal distance
is the minimum over all (pattern, wrong class) pairs. "Beats" follows the package's criterion
(argmax with the first-index tie rule differs from y): f_j ≥ f_y for j < y, f_j > f_y for j > y.
The strict inequality is solved as f_j ≥ f_y + STRICT: ties are real here (where every unit of a
layer is off and the output has no bias, all logits are 0, and neighbouring regions touch that
tie only on a face), and a closed constraint would count such a face as adversarial for every
label. The margin moves a distance by at most STRICT / ||∇(f_j - f_y)||, far below any test's
tolerance.

Each QP is solved exactly (finite active-set method, no tolerance-driven iteration) as a
least-distance program through NNLS (Lawson & Hanson, "Solving Least Squares Problems", ch. 23).
Pairs are visited in increasing order of a lower bound, the distance to the farthest single
constraint, and the search stops once that bound reaches the best distance found (exact
branch and bound).

Use: `exact_min_distances(net, x, y)` for `nn.Sequential(Linear, ReLU, Linear[, ReLU, Linear ...])`
(an optional leading `nn.Flatten`), up to 16 hidden units in all.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn

MAX_HIDDEN = 16
STRICT = 1e-9  # logit margin standing in for ">" (see the module note)
_INFEASIBLE = 1e-9  # NNLS residual norm below this: the constraints have no common point


def affine_layers(net: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W, b) in float64 per Linear layer of Linear, ReLU, ..., Linear (a leading Flatten is skipped)."""
    modules = list(net.children()) if isinstance(net, nn.Sequential) else [net]
    if modules and isinstance(modules[0], nn.Flatten):
        modules = modules[1:]
    layers = []
    for k, module in enumerate(modules):
        expected = nn.Linear if k % 2 == 0 else nn.ReLU
        if not isinstance(module, expected):
            raise ValueError(f"expected Linear, ReLU, ..., Linear; layer {k} is {type(module).__name__}")
        if isinstance(module, nn.Linear):
            w = module.weight.detach().double().cpu().numpy()
            b = module.bias.detach().double().cpu().numpy() if module.bias is not None else np.zeros(len(w))
            layers.append((w, b))
    if len(modules) % 2 == 0 or len(layers) < 2:
        raise ValueError("expected Linear, ReLU, ..., Linear with at least one hidden layer")
    return layers


def linear_pieces(layers):
    """Every activation pattern's region and affine map, as stacked arrays over patterns P.

    Returns (G, h, A, c): the region is {x : G[p] x ≤ h[p]} (one row per hidden unit, its sign
    condition) and the network there is x ↦ A[p] x + c[p].
    """
    sizes = [len(w) for w, _ in layers[:-1]]
    if sum(sizes) > MAX_HIDDEN:
        raise ValueError(f"{sum(sizes)} hidden units: enumerating 2^{sum(sizes)} patterns is too many")
    masks = np.array(list(itertools.product((0.0, 1.0), repeat=sum(sizes))))
    d = layers[0][0].shape[1]
    amap = np.broadcast_to(np.eye(d), (len(masks), d, d))
    offset = np.zeros((len(masks), d))
    g_rows, h_rows, start = [], [], 0
    for (w, b), size in zip(layers[:-1], sizes):
        pre_a = np.einsum("ij,pjk->pik", w, amap)
        pre_c = offset @ w.T + b
        on = masks[:, start:start + size]
        sign = 2 * on - 1  # on: pre ≥ 0, i.e. -pre ≤ 0; off: pre ≤ 0
        g_rows.append(-sign[:, :, None] * pre_a)
        h_rows.append(sign * pre_c)
        amap, offset = on[:, :, None] * pre_a, on * pre_c
        start += size
    w, b = layers[-1]
    return (np.concatenate(g_rows, 1), np.concatenate(h_rows, 1),
            np.einsum("ij,pjk->pik", w, amap), offset @ w.T + b)


def project(x0: np.ndarray, g: np.ndarray, h: np.ndarray) -> np.ndarray | None:
    """argmin ||z - x0|| over {z : g z ≤ h} (None if empty), as a least-distance program via NNLS."""
    # with z = x0 + u: minimize ||u|| s.t. E u ≥ f, E = -g, f = g x0 - h
    e, f = -g, g @ x0 - h
    norms = np.linalg.norm(e, axis=1)
    zero = norms < 1e-14
    if np.any(f[zero] > 1e-12):
        return None
    e, f = e[~zero] / norms[~zero, None], f[~zero] / norms[~zero]
    if len(e) == 0:
        return x0.copy()
    matrix = np.vstack([e.T, f[None, :]])
    target = np.zeros(len(matrix))
    target[-1] = 1.0
    weights, _ = nnls(matrix, target, maxiter=50 * matrix.shape[1])
    residual = matrix @ weights - target
    # at the NNLS optimum ||residual||² = -residual[-1]; zero means no feasible point
    if -residual[-1] < _INFEASIBLE:
        return None
    return x0 - residual[:-1] / residual[-1]


def _halfspace_distance(g: np.ndarray, h: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """Distance from x0 to each halfspace g_i z ≤ h_i (inf for an empty one, 0 inside); any leading shape."""
    norms = np.linalg.norm(g, axis=-1)
    excess = np.einsum("...k,k->...", g, x0) - h
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.where(norms > 1e-14, np.maximum(excess, 0) / norms, np.where(excess > 1e-12, np.inf, 0.0))
    return dist


def exact_point(pieces, x0: np.ndarray, label: int) -> tuple[float, np.ndarray]:
    """(exact minimal distance, a minimizer) for one input; (0, x0) if x0 is already adversarial."""
    g, h, a, c = pieces
    d = len(x0)
    box_g = np.vstack([np.eye(d), -np.eye(d)])
    box_h = np.concatenate([np.ones(d), np.zeros(d)])
    region_bound = _halfspace_distance(g, h, x0).max(1)  # (P,)
    # wrong class j beats the label: (a_y - a_j) z ≤ c_j - c_y
    cls_g = a[:, label:label + 1, :] - a
    classes = np.arange(a.shape[1])
    cls_h = c - c[:, label:label + 1] - np.where(classes > label, STRICT, 0.0)
    cls_bound = _halfspace_distance(cls_g, cls_h, x0)  # (P, C)
    bound = np.where(classes == label, np.inf, np.maximum(region_bound[:, None], cls_bound))
    best, best_point = np.inf, x0.copy()
    for flat in np.argsort(bound, axis=None):
        p, j = np.unravel_index(flat, bound.shape)
        if not bound[p, j] < best:
            break
        rows_g = np.vstack([g[p], cls_g[p, j][None, :], box_g])
        rows_h = np.concatenate([h[p], cls_h[p, j][None], box_h])
        point = project(x0, rows_g, rows_h)
        if point is None or np.max(rows_g @ point - rows_h) > 1e-7:
            continue
        dist = float(np.linalg.norm(point - x0))
        if dist < best:
            best, best_point = dist, point
    return best, best_point


def exact_min_distances(net: nn.Module, x, y, *, return_points: bool = False):
    """Exact minimal L2 distance (float64, (N,)) from each x[n] to a point of [0,1]^d that `net`
    does not assign to y[n]; 0 where x[n] is misclassified. `x` is (N, ...) and is flattened.
    With `return_points`, also the minimizers, shaped (N, d)."""
    layers = affine_layers(net)
    pieces = linear_pieces(layers)
    xs = torch.as_tensor(x).detach().double().cpu().flatten(1).numpy()
    ys = torch.as_tensor(y).detach().cpu().numpy().astype(int)
    with torch.no_grad():
        inputs = torch.as_tensor(x).detach().to(next(net.parameters()).dtype)
        wrong = net(inputs).argmax(1).cpu().numpy() != ys
    distances = np.zeros(len(xs))
    points = xs.copy()
    for n, (x0, label) in enumerate(zip(xs, ys)):
        if not wrong[n]:
            distances[n], points[n] = exact_point(pieces, x0, int(label))
    return (distances, points) if return_points else distances


def random_relu_net(seed: int, *, inputs: int, hidden: tuple[int, ...] = (8,), classes: int = 3,
                    output_bias: bool = False) -> nn.Sequential:
    """A random float32 ReLU network Linear, ReLU, ..., Linear, in eval mode. The first layer's
    hyperplanes pass through random points of the box, so its activation regions cut the box."""
    gen = torch.Generator().manual_seed(seed)
    sizes = (inputs, *hidden)
    modules: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layer = nn.Linear(n_in, n_out)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(n_out, n_in, generator=gen))
            if not modules:
                anchor = torch.rand(n_out, n_in, generator=gen)
                layer.bias.copy_(-(layer.weight * anchor).sum(1))
            else:
                layer.bias.copy_(torch.randn(n_out, generator=gen) * 0.5)
        modules += [layer, nn.ReLU()]
    last = nn.Linear(sizes[-1], classes, bias=output_bias)
    with torch.no_grad():
        last.weight.copy_(torch.randn(classes, sizes[-1], generator=gen))
        if output_bias:
            last.bias.copy_(torch.randn(classes, generator=gen) * 0.5)
    return nn.Sequential(*modules, last).eval()


def random_problem(seed: int, *, inputs: int, hidden: tuple[int, ...] = (8,), classes: int = 3,
                   points: int = 10) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, np.ndarray]:
    """(net, x, y, exact distances): uniform points in [0,1]^d labelled with the net's own prediction,
    so every point is correctly classified and has a positive exact distance.

    Two kinds of points are skipped, both tied to regions where the net is constant (every unit of a
    layer off; without output bias all logits are 0 there): points inside such a region (no gradient
    leads out), and points whose infimum lies on the face of one where the tie goes to the label
    itself (y = 0): that infimum is not attained, only approached through logits within 1e-6 of a tie.
    """
    net = random_relu_net(seed, inputs=inputs, hidden=hidden, classes=classes)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(20 * points, inputs, generator=gen)
    with torch.no_grad():
        logits = net(x)
    live = (logits.amax(1) - logits.amin(1)) > 1e-6
    x, y = x[live][:2 * points], logits[live][:2 * points].argmax(1)
    exact, nearest = exact_min_distances(net, x, y, return_points=True)
    with torch.no_grad():
        at_nearest = net.double()(torch.from_numpy(nearest))
    net.float()
    attained = ((at_nearest.amax(1) - at_nearest.amin(1)) > 1e-6) | (y != 0)
    keep = torch.nonzero(attained).flatten()[:points]
    return net, x[keep], y[keep], exact[keep.numpy()]
