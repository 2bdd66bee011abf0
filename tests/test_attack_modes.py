"""The runner attacks a model in eval mode and gives it back in its own mode; models without input
gradients are recognised before any gradient attack runs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robustmargin.attacks import minimal_distances, run_attack
from robustmargin.attacks.runner import eval_mode
from robustmargin.errors import UserError
from test_attack_oracle import make_problem


def dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))


def batchnorm_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(48, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[1].running_var.uniform_(0.02, 0.1)
    return model


def points(model: nn.Module, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("make", [dropout_mlp, batchnorm_cnn], ids=["dropout", "batchnorm"])
def test_a_model_in_train_mode_is_attacked_in_eval_mode(make):
    model = make()
    x, y = points(model)
    expected = run_attack(model, x, y, "ddn", steps=50).distances  # the model is in eval mode here
    model.train()
    model[1].eval()  # a mixed state must come back exactly
    before_flags = flags(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    got = run_attack(model, x, y, "ddn", steps=50).distances
    assert torch.equal(got, expected)
    assert bool((got > 0).all() and torch.isfinite(got).all()), "every correct point gets a distance"
    assert flags(model) == before_flags
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items()), "running statistics moved"
    both = minimal_distances(model, x, y, attack=["ddn", "fmn"], ddn={"steps": 50}, fmn={"steps": 50})
    assert bool((both <= got).all()) and flags(model) == before_flags


def test_eval_mode_restores_flags_after_an_error():
    model = dropout_mlp().train()
    model[3].eval()
    before = flags(model)
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            assert not any(flags(model))
            raise RuntimeError("inside")
    assert flags(model) == before

    def failing(m, inputs, labels):
        assert not m.training
        raise RuntimeError("attack failed")

    x, y = points(dropout_mlp())
    with pytest.raises(RuntimeError, match="attack failed"):
        run_attack(model, x, y, failing)
    assert flags(model) == before


class ArgmaxOneHot(nn.Module):
    """The linear oracle's decisions as a one-hot output: no gradient at all."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return nn.functional.one_hot(self.inner(x).argmax(1), 4).float()


class Quantized(nn.Module):
    """Inputs rounded to 8 levels before the linear layer: a gradient that is zero everywhere."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 7) / 7)


@pytest.mark.parametrize("wrap,what", [(ArgmaxOneHot, "no gradient"), (Quantized, "zero")])
@pytest.mark.parametrize("attack", ["ddn", "alma", "cw", "foolbox-ddn"])
def test_models_without_gradients_are_a_user_error(wrap, what, attack):
    model, x, y, _ = make_problem()
    with pytest.raises(UserError) as err:
        run_attack(wrap(model), x, y, attack)
    message = str(err.value)
    assert what in message and "foolbox-hsj" in message and "\n" not in message
    with pytest.raises(UserError, match="foolbox-hsj"):
        minimal_distances(wrap(model), x, y, attack="ensemble")


def test_decision_based_attack_runs_without_gradients():
    model, x, y, exact = make_problem()
    x, y, exact = x[:6], y[:6], exact[:6]
    d = run_attack(ArgmaxOneHot(model), x, y, "foolbox-hsj", steps=10, max_gradient_eval_steps=200).distances
    assert bool(torch.isfinite(d).all())
    assert bool((d >= exact * (1 - 1e-5)).all())
