"""ALMA and minimal-norm APGD against exact distances: a linear classifier (closed form, see
test_attack_oracle.py) and small random ReLU networks (tests/relu_exact.py). An attack returns a
verified adversarial, so it can never be below the exact distance; the medians must be within 1 %.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from relu_exact import random_problem
from robustmargin.attacks import alma, apgd, run_attack
from robustmargin.attacks.alma import first_step_lr, penalty_p2, penalty_p2_slope
from robustmargin.attacks.apgd import checkpoints
from robustmargin.attacks.runner import budget_options
from robustmargin.errors import UserError
from test_attack_oracle import make_problem

REL, ABS = 1e-5, 1e-6
FAST = {"alma": {"steps": 300}, "apgd": {"steps": 30, "search_steps": 8}}
NETS = [(3, 4, (6,)), (6, 5, (7,)), (6, 6, (8,)), (3, 4, (8,)), (4, 5, (8,))]


@pytest.fixture(scope="module")
def linear():
    return make_problem()


@pytest.fixture(scope="module")
def relu_problems():
    return [random_problem(seed, inputs=d, hidden=h, points=10) for seed, d, h in NETS]


def relu_ratios(problems, name, options):
    parts, exacts = [], []
    for net, x, y, exact in problems:
        result = run_attack(net, x, y, name, batch_size=len(x), **options)
        assert bool(result.correct.all())
        parts.append(result.distances.numpy() / exact)
        exacts.append(exact)
    return np.concatenate(parts), np.concatenate(exacts)


@pytest.mark.parametrize("name", ["alma", "apgd"])
def test_linear_oracle(linear, name):
    model, x, y, exact = linear
    ratio = (run_attack(model, x, y, name, **FAST[name]).distances / exact).numpy()
    assert ratio.min() >= 1 - REL, f"{name} reported {ratio.min():.6f} of the exact distance"
    assert np.median(ratio) <= 1.01
    assert ratio.max() <= 1.2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alma", "apgd"])
def test_linear_oracle_at_paper_defaults(linear, name):
    model, x, y, exact = linear
    ratio = (run_attack(model, x, y, name).distances / exact).numpy()
    assert ratio.min() >= 1 - REL and np.median(ratio) <= 1.001 and ratio.max() <= 1.05


def test_relu_exact_oracle_apgd_short(relu_problems):
    """APGD at a fifth of its paper budget (ALMA needs its full 1000 steps here: slow test below)."""
    name = "apgd"
    r, exact = relu_ratios(relu_problems, name, {"steps": 20, "search_steps": 10})
    assert np.all(r * exact >= exact * (1 - REL) - ABS), "below the exact distance"
    assert np.median(r) <= 1.01, f"{name}: median ratio {np.median(r):.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alma", "apgd"])
def test_relu_exact_oracle_at_paper_defaults(relu_problems, name):
    """~25 s each."""
    r, exact = relu_ratios(relu_problems, name, {})
    assert np.all(r * exact >= exact * (1 - REL) - ABS)
    assert np.median(r) <= 1.01


@pytest.mark.parametrize("attack", [alma, apgd], ids=["alma", "apgd"])
def test_seeded_runs_repeat_bit_for_bit(relu_problems, attack):
    net, x, y, _ = relu_problems[1]
    options = {"steps": 30, "restarts": 2} if attack is alma else {"steps": 10, "search_steps": 3, "restarts": 2}
    first = attack(net, x, y, seed=3, **options)
    assert torch.equal(first, attack(net, x, y, seed=3, **options))
    assert not torch.equal(first, attack(net, x, y, seed=4, **options))


def test_penalty_p2_slope_is_its_derivative():
    g = torch.tensor([-3.0, -0.2, 0.0, 0.1, 2.0], dtype=torch.float64, requires_grad=True)
    rho = torch.tensor([1.0, 2.0, 1.5, 0.5, 3.0], dtype=torch.float64)
    mu = torch.tensor([0.5, 1.0, 2.0, 1.0, 0.1], dtype=torch.float64)
    (numeric,) = torch.autograd.grad(penalty_p2(g, rho, mu).sum(), g)
    assert torch.allclose(penalty_p2_slope(g.detach(), rho, mu), numeric)
    # continuous through g = 0 with value 0 and slope μ
    assert float(penalty_p2(torch.zeros(1), torch.ones(1), torch.ones(1))) == 0.0


def test_apgd_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (increments shrink by 0.03, at least 0.06)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize("attack,options", [(alma, {"steps": 0}), (apgd, {"search_steps": 0}),
                                            (apgd, {"init_epsilon": -1.0}), (alma, {"restarts": 0})])
def test_bad_hyperparameters_are_user_errors(linear, attack, options):
    model, x, y, _ = linear
    with pytest.raises(UserError):
        attack(model, x[:2], y[:2], **options)


def test_fast_alma_is_the_authors_100_step_setting(linear):
    """α = 0.5 and a first step sized to 0.1 (the authors' MNIST script); with the former fixed lr = 0.1
    and α = 0.9, 100 steps ended at a median 1.011 of the exact distance here, now 1.0001."""
    assert budget_options("alma", "fast") == {"steps": 100, "alpha": 0.5, "init_lr_distance": 0.1}
    model, x, y, exact = linear
    ratio = (run_attack(model, x, y, "alma", **budget_options("alma", "fast")).distances / exact).numpy()
    assert ratio.min() >= 1 - REL and np.median(ratio) <= 1.002 and ratio.max() <= 1.01


def test_first_step_lr_sizes_the_step():
    gen = torch.Generator().manual_seed(0)
    start = torch.rand(5, 1, 4, 4, generator=gen, dtype=torch.float64)
    scales = torch.tensor([1e-3, 0.1, 1.0, 10.0, 1e3], dtype=torch.float64).view(-1, 1, 1, 1)
    grad = torch.randn(5, 1, 4, 4, generator=gen, dtype=torch.float64) * scales
    for distance in (0.1, 1.0):
        lr = first_step_lr(start, grad, distance, 0.1)
        step = ((start - lr.view(-1, 1, 1, 1) * grad).clamp(0, 1) - start).flatten(1).norm(dim=1)
        assert torch.allclose(step, torch.full_like(step, distance), rtol=1e-4)
    # where the box keeps every step short of the distance: the fallback, not an endless search
    corner = torch.ones(2, 4, dtype=torch.float64)
    grad = torch.tensor([[-1.0] * 4, [-1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)  # the second can move
    lr = first_step_lr(corner, grad, 0.5, 0.1)
    assert float(lr[0]) == 0.1 and float(lr[1]) == pytest.approx(0.5, rel=1e-5)


def test_alma_init_lr_distance_must_be_positive(linear):
    model, x, y, _ = linear
    with pytest.raises(UserError, match="init_lr_distance"):
        alma(model, x[:2], y[:2], init_lr_distance=0.0)
