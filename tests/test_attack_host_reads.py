"""DDN, FMN and APGD decide on the device where a gradient is zero: no host read per step.

Three checks: against the attacks as they were before the check moved to the device (loaded from
git), bit for bit where no gradient is zero; against the host-synced form of the same step
(`if dead.any()`), bit for bit on a network with flat regions where gradients are zero; and the
attacks never turn a tensor into a Python value (on the CPU), nor synchronize the GPU more often
with more steps (on a GPU, where there is one).
"""
from __future__ import annotations

import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from robustmargin.attacks import alma, apgd, ddn, fmn
from robustmargin.attacks.cw import batch_view

# The last commit with the host-synced zero-gradient check.
HOST_SYNCED = "043c530"
REPO = Path(__file__).resolve().parents[1]

OPTIONS = {
    "ddn": {"steps": 25, "restarts": 2},
    "fmn": {"steps": 25, "restarts": 2},
    "apgd": {"steps": 5, "search_steps": 4, "restarts": 2},
}
ATTACKS = {"ddn": ddn, "fmn": fmn, "apgd": apgd}


def mlp(seed: int, classes: int) -> nn.Module:
    """Centred on the box's centre, so that its classes share the box."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.ReLU(),
                          nn.Linear(16, classes, bias=False)).eval()
    with torch.no_grad():
        model[0].bias.copy_(-0.5 * model[0].weight.sum(1))
    return model


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 6 * 6, 5, bias=False)).eval()


def problem(model: nn.Module, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(8, *shape, generator=torch.Generator().manual_seed(seed))
    x[:, ..., :2] = 0.0  # on the box edge, as MNIST backgrounds are
    with torch.no_grad():
        return x, model(x).argmax(1)


def flat_net() -> nn.Module:
    """Near the origin every ReLU is off: all logits are 0 there (a tie, adversarial for labels ≠ 0)
    and every gradient is exactly zero, so the attacks step through it on their random directions."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3, bias=False)).eval()
    with torch.no_grad():
        net[0].weight.copy_(0.1 * torch.rand(6, 4) + torch.kron(torch.eye(2), torch.ones(3, 2)))
        net[0].bias.fill_(-0.6)
        net[2].weight.copy_(torch.tensor([[-1.0] * 6, [1.0] * 3 + [0.3] * 3, [0.3] * 3 + [1.0] * 3]))
    return net


def old_modules() -> dict[str, types.ModuleType]:
    """ddn, fmn and apgd as of HOST_SYNCED, imported from git; fmn and apgd see the old ddn."""
    def source(name: str) -> str:
        try:
            return subprocess.run(["git", "show", f"{HOST_SYNCED}:robustmargin/attacks/{name}.py"], cwd=REPO,
                                  capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            pytest.skip(f"the git history with commit {HOST_SYNCED} is not available")

    modules = {}
    saved = sys.modules["robustmargin.attacks.ddn"]
    try:
        for name in ("ddn", "fmn", "apgd"):
            module = types.ModuleType(f"host_synced_{name}")
            exec(compile(source(name), f"{HOST_SYNCED}:{name}.py", "exec"), module.__dict__)
            modules[name] = module
            if name == "ddn":
                sys.modules["robustmargin.attacks.ddn"] = module
    finally:
        sys.modules["robustmargin.attacks.ddn"] = saved
    return modules


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_bit_for_bit_with_the_host_synced_attacks(name):
    """Where no gradient is zero the former code drew nothing extra, so results must be identical.
    Where one is (APGD's DLR loss is flat wherever the label ranks third), the former code drew the
    direction from the restarts' stream, so later random starts differ; those runs are left to the
    next test."""
    old_modules_ = old_modules()
    old, old_normalized = getattr(old_modules_[name], name), old_modules_["ddn"].normalized
    dead: list[int] = []

    def spy(g, *, generator):
        dead.append(int((g.flatten(1).norm(dim=1) == 0).sum()))
        return old_normalized(g, generator=generator)

    old_modules_[name].normalized = spy
    cases = [(mlp(0, 4), (12,), 0), (mlp(1, 4), (12,), 1), (mlp(2, 2), (12,), 2), (mlp(3, 2), (12,), 3),
             (cnn(2), (1, 6, 6), 2)]
    compared = 0
    for model, shape, seed in cases:
        x, y = problem(model, shape, seed)
        for attack_seed in (0, 7):
            dead.clear()
            theirs = old(model, x, y, seed=attack_seed, **OPTIONS[name])
            if any(dead):
                continue
            ours = ATTACKS[name](model, x, y, seed=attack_seed, **OPTIONS[name])
            assert torch.equal(ours, theirs)
            found = (ours != x).flatten(1).any(1)  # compare results, not inputs returned unchanged
            assert int(found.sum()) >= len(x) // 2
            compared += 1
    assert compared >= 4


def host_synced_normalized(calls: list[int]):
    """The former step: substitute the random direction only when the host has read that some row is dead."""
    def normalized(g: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        norms = g.flatten(1).norm(dim=1)
        dead = norms == 0
        if bool(dead.any()):
            calls.append(int(dead.sum()))
            g = torch.where(batch_view(dead, g), noise, g)
            norms = g.flatten(1).norm(dim=1)
        return g / batch_view(norms.clamp_min(1e-12), g)
    return normalized


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_device_side_check_equals_the_host_synced_one_where_gradients_vanish(name, monkeypatch):
    net = flat_net()
    gen = torch.Generator().manual_seed(5)
    x = 0.05 * torch.rand(12, 4, generator=gen)
    x[:6, :2] += 0.3 + 0.15 * torch.rand(6, 2, generator=gen)
    x[6:, 2:] += 0.3 + 0.15 * torch.rand(6, 2, generator=gen)
    with torch.no_grad():
        y = net(x).argmax(1)
    assert set(y.tolist()) == {1, 2}
    options = dict(OPTIONS[name], steps=40) if name != "apgd" else OPTIONS[name]
    ours = ATTACKS[name](net, x, y, seed=1, **options)
    calls: list[int] = []
    for module in ("ddn", "fmn", "apgd"):  # the modules (the package's names are the functions)
        monkeypatch.setattr(sys.modules[f"robustmargin.attacks.{module}"], "normalized", host_synced_normalized(calls))
    theirs = ATTACKS[name](net, x, y, seed=1, **options)
    assert calls, "no gradient was zero: the case does not test the substitution"
    assert torch.equal(ours, theirs)


HOST_READS = ("__bool__", "item", "__float__", "__int__", "__index__", "tolist")


@pytest.mark.parametrize("name", sorted(ATTACKS) + ["alma"])
def test_no_tensor_becomes_a_python_value(name, monkeypatch):
    model = cnn(4)
    x, y = problem(model, (1, 6, 6), 4)
    attack = {**ATTACKS, "alma": alma}[name]
    options = OPTIONS.get(name, {"steps": 25, "restarts": 2})
    expected = attack(model, x, y, **options)

    def refuse(self, *args, **kwargs):
        raise AssertionError("host read")

    for method in HOST_READS:
        monkeypatch.setattr(torch.Tensor, method, refuse)
    got = attack(model, x, y, **options)
    monkeypatch.undo()
    assert torch.equal(got, expected)
    with pytest.raises(AssertionError, match="host read"):  # the patch does catch a read
        for method in HOST_READS:
            monkeypatch.setattr(torch.Tensor, method, refuse)
        bool(x.sum() > 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_gpu_synchronizations_do_not_grow_with_steps(name):
    model = cnn(5).cuda()
    x, y = (t.cuda() for t in problem(cnn(5), (1, 6, 6), 5))

    def syncs(steps: int) -> int:
        options = dict(OPTIONS[name], steps=steps)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ATTACKS[name](model, x, y, **options)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return len(caught)

    assert syncs(5) == syncs(20)
