"""Running attacks and measuring them: batching, skipping misclassified points, verification, cost.

An attack only proposes points. Here every proposed point is re-checked by running the
model (misclassified, inside [0,1] up to `BOX_TOLERANCE`, same shape, finite) and its
plain L2 distance is measured on the point itself; a point failing the check is a
failure (distance inf), never a success. Points the model already misclassifies get
distance 0 and are never attacked. Cost is counted per attack: wall time, and samples
through the model's forward and backward passes (a counting wrapper around the model).

The model is attacked and re-checked in eval mode (Dropout off, BatchNorm on its running
statistics, which then stay as they were), whatever mode it comes in; each submodule's
training flag is restored afterwards (`eval_mode`). Gradient attacks first check on a few
inputs that the model's outputs have a gradient at all (an argmax or one-hot output has
none); without one, the decision-based attack foolbox-hsj is the one to use.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from robustmargin.attacks.criterion import is_adversarial
from robustmargin.attacks.alma import alma
from robustmargin.attacks.apgd import apgd
from robustmargin.attacks.cw import carlini_wagner_l2
from robustmargin.attacks.ddn import ddn
from robustmargin.attacks.fmn import fmn
from robustmargin.attacks.foolbox_backend import FOOLBOX_ATTACKS
from robustmargin.errors import UserError

AttackFn = Callable[..., Tensor]

ATTACKS: dict[str, AttackFn] = {"cw": carlini_wagner_l2, "ddn": ddn, "fmn": fmn, **FOOLBOX_ATTACKS}
ATTACKS.update(alma=alma, apgd=apgd)

# The fast default ensemble and its budgets, chosen by the tail benchmark (scripts/bench_attacks.py,
# part c): per point, the ratio to the best distance any attack found at 10x these steps. On the quick
# preset's first and last checkpoints (train and test) single gradient runs end in different local
# minima of the decision boundary, so longer runs barely help and diversity does: the cheapest
# ensembles reach the tail best when they mix DDN, ALMA and APGD with random restarts. This one costs
# ~1000 forward+backward passes per point (2.5x the former DDN + FMN at 100 steps) and cut the
# 90th-percentile ratio from ~1.09 to ~1.02-1.03 and the worst from ~1.39 to ~1.16-1.25; no ensemble
# within 3x that cost reached 1.01 / 1.05. CW is not in the fast default: its tanh
# parametrization moves pixels sitting at 0 or 1 (most of an MNIST digit) very slowly,
# so a short CW is both the slowest and the weakest of the three (at 3-5 rounds of 100
# steps with the reference lr it failed on ~40 % of points of a quick-preset model).
# Its fast budget therefore uses a larger Adam lr; `budget="reference"` restores 0.01.
ENSEMBLE: tuple[str, ...] = ("ddn", "alma", "apgd")
FAST_SETTINGS: dict[str, dict[str, Any]] = {
    "ddn": {"steps": 100},
    "fmn": {"steps": 100},
    "cw": {"steps": 100, "binary_search_steps": 4, "initial_const": 0.1, "lr": 0.1},
    "foolbox-cw": {"steps": 100, "binary_search_steps": 4, "initial_const": 0.1, "lr": 0.1},
    "foolbox-ddn": {"steps": 100},
    "foolbox-fmn": {"steps": 100},
    "foolbox-hsj": {"steps": 40, "max_gradient_eval_steps": 1000},
    # the authors' 100-step MNIST setting (see alma.py): RMSProp/μ weight 0.5, first step sized to 0.1
    "alma": {"steps": 100, "alpha": 0.5, "init_lr_distance": 0.1},
    "apgd": {"steps": 10, "search_steps": 10, "restarts": 3},
}
# The strong budget: CW at its reference settings, DDN and FMN with random restarts. A single
# gradient run can stop in a local minimum of a ReLU network's piecewise-linear boundary: on the
# small random networks of tests/test_attack_exact.py each attack alone, even CW at reference
# settings or DDN/FMN with 10 restarts, ends 1.4-8x above the exact distance on some point, while
# the per-sample minimum over this ensemble was within 0.3 % of it on all 50 points.
STRONG_SETTINGS: dict[str, dict[str, Any]] = {
    "ddn": {"steps": 100, "restarts": 10},
    "fmn": {"steps": 100, "restarts": 10},
}
# Budget name → per-attack settings (an attack not listed runs at its reference defaults) and
# the attacks "ensemble" stands for.
BUDGETS: dict[str, dict[str, dict[str, Any]]] = {"fast": FAST_SETTINGS, "reference": {}, "strong": STRONG_SETTINGS}
ENSEMBLES: dict[str, tuple[str, ...]] = {"fast": ENSEMBLE, "reference": ENSEMBLE, "strong": ("cw", "ddn", "fmn")}

BOX_TOLERANCE = 1e-6
DECISION_BASED = frozenset({"foolbox-hsj"})  # attacks that need only the model's decisions
GRADIENT_PROBE = 8  # inputs on which gradient attacks check that the model has a gradient


def get_attack(name: str) -> AttackFn:
    try:
        return ATTACKS[name]
    except KeyError:
        raise UserError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}") from None


def attack_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Check `options` against the attack's keyword-only hyperparameters; unknown → UserError."""
    fn = get_attack(name)
    allowed = {
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"attack {name!r} has no option {unknown[0]!r}; options: {', '.join(sorted(allowed))}")
    return dict(options)


def budget_options(name: str, budget: str, *, steps: int | None = None) -> dict[str, Any]:
    """One attack's hyperparameters under a budget (see BUDGETS), optionally with `steps` overridden."""
    if budget not in BUDGETS:
        raise UserError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    options = dict(BUDGETS[budget].get(name, {}))
    if steps is not None:
        options["steps"] = steps
    return attack_options(name, options)


def fast_options(name: str, *, steps: int | None = None) -> dict[str, Any]:
    """The fast-budget hyperparameters of one attack, optionally with `steps` overridden."""
    return budget_options(name, "fast", steps=steps)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block; every submodule's training flag as it was afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def check_gradients(model: nn.Module, x: Tensor, name: str) -> None:
    """UserError unless the outputs on the first few inputs have a nonzero, finite input gradient."""
    probe = x[:GRADIENT_PROBE].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(probe)
        grad = None
        if isinstance(out, Tensor) and out.requires_grad:
            # a fixed random mix of the outputs: zero only where the whole Jacobian is
            mix = torch.randn(out.shape[1:], generator=torch.Generator().manual_seed(0), dtype=out.dtype)
            (grad,) = torch.autograd.grad((out * mix.to(out.device)).sum(), probe, allow_unused=True)
    if grad is None or not bool(torch.isfinite(grad).all()) or not bool((grad != 0).any()):
        what = "no gradient" if grad is None else "a zero or non-finite gradient"
        raise UserError(f"the model's outputs have {what} with respect to its inputs, so the gradient attack "
                        f"{name!r} cannot run; use the decision-based attack 'foolbox-hsj'")


class CountingModel(nn.Module):
    """Wraps a model; counts samples through forward and, via an output hook, through backward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)
        self.forwards = 0
        self.backwards = 0

    def forward(self, x: Tensor) -> Tensor:
        n = int(x.shape[0])
        self.forwards += n
        out = self.model(x)
        if out.requires_grad:
            out.register_hook(lambda grad: self._count_backward(n))
        return out

    def _count_backward(self, n: int) -> None:
        self.backwards += n


@dataclass
class AttackResult:
    """Per-sample outcome of one attack: distance 0 = misclassified, inf = attack failure."""

    attack: str
    distances: Tensor  # float64, (N,)
    adversarials: Tensor  # the verified points; the input where the attack failed
    correct: Tensor  # bool, (N,): clean prediction right
    seconds: float
    forwards: int
    backwards: int
    attacked: int

    @property
    def points_per_second(self) -> float:
        """Attacked points per second of attack time (the throughput benchmarks compare)."""
        return self.attacked / self.seconds if self.seconds > 0 else math.inf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def misclassified(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int) -> Tensor:
    """Boolean (N,): the criterion every attack uses, evaluated in batches."""
    return torch.cat([is_adversarial(model(x[i : i + batch_size]), y[i : i + batch_size])
                      for i in range(0, len(x), batch_size)])


@torch.no_grad()
def verify(model: nn.Module, x: Tensor, y: Tensor, adv: Tensor, *, batch_size: int) -> tuple[Tensor, Tensor]:
    """Return (distances, points): plain L2 distance of each verified point, inf where the check fails."""
    if adv.shape != x.shape:
        return torch.full((len(x),), math.inf, dtype=torch.float64, device=x.device), x.clone()
    adv = adv.to(device=x.device, dtype=x.dtype)
    flat = adv.flatten(1)
    in_box = torch.isfinite(flat).all(1) & (flat.amin(1) >= -BOX_TOLERANCE) & (flat.amax(1) <= 1 + BOX_TOLERANCE)
    wrong = misclassified(model, adv, y, batch_size=batch_size)
    ok = in_box & wrong
    dist = (adv.double() - x.double()).flatten(1).norm(dim=1)
    dist = torch.where(ok, dist, torch.full_like(dist, math.inf))
    points = torch.where(ok.view(-1, *([1] * (x.dim() - 1))), adv, x)
    return dist, points


def run_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: str | AttackFn,
    *,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    on_batch: Callable[[int], None] | None = None,
    **options: Any,
) -> AttackResult:
    """Attack every correctly classified point of (x, y) in batches; verify and measure each result.

    The model is moved to `device` (default: the device of `x`) and attacked in eval mode; its
    submodules' training flags are restored afterwards. A named gradient attack first checks that
    the model has input gradients (`check_gradients`). `on_batch(k)` is called after each batch
    with the number of points it held (progress bars).
    """
    with eval_mode(model):
        return _run_attack(model, x, y, attack, batch_size=batch_size, device=device, on_batch=on_batch, **options)


def _run_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: str | AttackFn,
    *,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    on_batch: Callable[[int], None] | None = None,
    **options: Any,
) -> AttackResult:
    if isinstance(attack, str):
        name, fn = attack, get_attack(attack)
        options = attack_options(attack, options)
    else:
        name, fn = getattr(attack, "__name__", "custom"), attack
    if batch_size < 1:
        raise UserError("batch size must be at least 1")
    if x.dim() < 2 or y.shape != (len(x),):
        raise UserError(f"expected inputs (N, ...) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    dev = torch.device(device) if device is not None else x.device
    model = model.to(dev)
    x_dev, y_dev = x.detach().to(dev), y.detach().to(dev)
    if isinstance(attack, str) and name not in DECISION_BASED and len(x):
        check_gradients(model, x_dev, name)
    counter = CountingModel(model)

    correct = ~misclassified(model, x_dev, y_dev, batch_size=batch_size)
    distances = torch.zeros(len(x), dtype=torch.float64, device=dev)
    points = x_dev.clone()
    todo = torch.nonzero(correct).flatten()
    seconds = 0.0
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        xb, yb = x_dev[idx], y_dev[idx]
        _sync(dev)
        t0 = time.perf_counter()
        adv = fn(counter, xb.clone(), yb.clone(), **options)
        _sync(dev)
        seconds += time.perf_counter() - t0
        distances[idx], points[idx] = verify(model, xb, yb, adv.detach(), batch_size=batch_size)
        if on_batch is not None:
            on_batch(len(idx))
    if on_batch is not None and len(x) > len(todo):
        on_batch(len(x) - len(todo))
    return AttackResult(
        attack=name,
        distances=distances.cpu(),
        adversarials=points.to(x.device),
        correct=correct.cpu(),
        seconds=seconds,
        forwards=counter.forwards,
        backwards=counter.backwards,
        attacked=len(todo),
    )


def _attack_list(attack: str | Sequence[str], budget: str) -> list[str] | None:
    """None for a single attack name; the list of names for "ensemble" or a sequence."""
    if isinstance(attack, str):
        if attack == "ensemble":
            return list(ENSEMBLES[budget])
        if "," in attack:
            return [a.strip() for a in attack.split(",") if a.strip()]
        return None
    names = list(attack)
    if not names:
        raise UserError("no attack given")
    return names


def minimal_distances(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: str | Sequence[str] = "cw",
    *,
    budget: str | None = None,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> Tensor:
    """Per-sample minimal L2 adversarial distance found (0 misclassified, inf failure), float64 (N,).

    One attack: `kwargs` are its hyperparameters, on top of the `budget`'s settings (its
    reference defaults when no budget is given). Several (`"ensemble"`, or a list of names):
    the per-sample minimum over attacks; `kwargs` then map attack names to option dicts, e.g.
    `attack=["ddn", "cw"], cw={"steps": 500}`. "ensemble" is ENSEMBLES[budget] and defaults
    to the fast budget; `budget="strong"` with "ensemble" is CW reference + DDN and FMN with
    restarts.
    """
    if budget is not None and budget not in BUDGETS:
        raise UserError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if budget is None and attack == "ensemble":
        budget = "fast"
    names = _attack_list(attack, budget or "reference")
    if names is None:
        options = budget_options(str(attack), budget) if budget is not None else {}
        options.update(kwargs)
        return run_attack(model, x, y, str(attack), batch_size=batch_size, device=device, **options).distances
    for key, value in kwargs.items():
        if key not in names or not isinstance(value, Mapping):
            raise UserError(f"with several attacks, options are given per attack as NAME={{...}}; got {key!r}")
    results = []
    for name in names:
        options = budget_options(name, budget) if budget is not None else {}
        options.update(kwargs.get(name, {}))
        results.append(run_attack(model, x, y, name, batch_size=batch_size, device=device, **options).distances)
    return per_sample_minimum(results)


def per_sample_minimum(distances: Iterable[Tensor]) -> Tensor:
    """The best (smallest) distance any attack found, per sample."""
    stacked = torch.stack([torch.as_tensor(d, dtype=torch.float64) for d in distances])
    return stacked.amin(dim=0)
