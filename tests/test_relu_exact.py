"""The exact ReLU oracle itself, against independent references: closed form and dense sampling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from relu_exact import exact_min_distances, project, random_relu_net


def test_projection_onto_a_polyhedron_matches_closed_form():
    # the nearest point of {z1 + z2 ≥ 1, z1 ≤ 0.2} to the origin is (0.2, 0.8)
    g = np.array([[-1.0, -1.0], [1.0, 0.0]])
    h = np.array([-1.0, 0.2])
    assert np.allclose(project(np.zeros(2), g, h), [0.2, 0.8], atol=1e-12)
    assert project(np.zeros(2), np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([0.0, -1.0])) is None


def test_affine_network_matches_the_analytic_distance():
    """On [0,1]^d, ReLU(x) = x, so Linear(I) → ReLU → Linear(W) is the linear model W x, whose
    distance to class j's halfspace is (w_y - w_j)·x / ||w_y - w_j|| when the foot lies in the box."""
    d, classes = 5, 3
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(classes, d, generator=gen, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(d, d, bias=False), nn.ReLU(), nn.Linear(d, classes, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(d, dtype=torch.float64))
        net[2].weight.copy_(w)
    x = 0.35 + 0.3 * torch.rand(200, d, generator=gen, dtype=torch.float64)
    y = (x @ w.T).argmax(1)
    diff = w[y][:, None, :] - w[None, :, :]  # (N, C, d)
    gap = ((x @ w.T).gather(1, y[:, None]) - x @ w.T)
    norm2 = diff.square().sum(2)
    norm2[torch.arange(len(x)), y] = 1.0
    dist = gap / norm2.sqrt()
    dist[torch.arange(len(x)), y] = torch.inf
    analytic, j = dist.min(1)
    foot = x - (gap.gather(1, j[:, None]) / norm2.gather(1, j[:, None])) * diff[torch.arange(len(x)), j]
    keep = ((foot > 0.01) & (foot < 0.99)).all(1)
    assert int(keep.sum()) >= 50
    exact = exact_min_distances(net, x[keep], y[keep])
    assert np.allclose(exact, analytic[keep].numpy(), rtol=1e-9, atol=1e-12)


def dense_minimum(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> np.ndarray:
    """Brute force on a 2-D grid: the nearest grid point the net (float64) does not assign to y."""
    axis = torch.linspace(0, 1, steps, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        pred = net.double()(grid).argmax(1)
    out = []
    for x0, label in zip(x.double(), y):
        d = (grid - x0).norm(dim=1)
        out.append(float(d[pred != label].min()))
    return np.array(out)


@pytest.mark.parametrize("seed,hidden,tie", [(12, (8,), False), (12, (6,), True), (14, (5, 4), False)],
                         ids=["one-layer", "tie-region", "two-layers"])
def test_two_dimensional_networks_match_dense_sampling(seed, hidden, tie):
    net = random_relu_net(seed, inputs=2, hidden=hidden, classes=3).double()
    if tie:  # every unit off on a corner region: all logits 0 there, so argmax names class 0
        with torch.no_grad():
            net[0].weight.copy_(torch.tensor([[1.0, 2.0], [2.0, 1.0], [1.5, 1.5], [3.0, 0.5], [0.5, 3.0], [1.0, 1.0]]))
            net[0].bias.copy_(-torch.tensor([0.6, 0.6, 0.5, 0.7, 0.7, 0.4]))
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(40, 2, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    steps = 601
    exact, points = exact_min_distances(net, x, y, return_points=True)
    brute = dense_minimum(net, x, y, steps)
    spacing = 1 / (steps - 1)
    assert np.all(np.isfinite(exact))
    assert np.all(exact <= brute + 1e-12), "a grid point is closer than the exact minimum"
    assert np.all(brute <= exact + 3 * spacing)
    if tie:
        assert np.any(y.numpy() != 0)
    # each minimizer lies in the box and on (or past) the decision boundary of its label
    assert points.min() >= -1e-9 and points.max() <= 1 + 1e-9
    with torch.no_grad():
        logits = net(torch.tensor(points))
    own = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -torch.inf).amax(1)
    assert bool((others >= own - 1e-9).all())


def test_misclassified_points_are_zero_and_bad_networks_are_refused():
    net = random_relu_net(0, inputs=3, hidden=(4,), classes=3)
    x = torch.rand(4, 3)
    with torch.no_grad():
        y = net(x).argmax(1)
    assert np.all(exact_min_distances(net, x, (y + 1) % 3) == 0)
    with pytest.raises(ValueError, match="Linear, ReLU"):
        exact_min_distances(nn.Sequential(nn.Linear(3, 2)), x, y)
