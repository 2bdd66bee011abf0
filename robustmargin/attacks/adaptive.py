"""The adaptive budget: a cheap ensemble on every point, further rounds only on the points in doubt.

Round 1 runs `round1` (ALMA at 500 steps and DDN at 100: 1200 forward and backward passes per
point) on every correctly classified point. A point is in doubt after it when
- its attacks disagree: the largest distance they found over the smallest (the spread) is above
  `spread_threshold`, or one failed where another succeeded; or
- its best distance is large against a cheap local estimate: above `estimate_threshold` times the
  distance to the linearized boundary |f_y - max_{j≠y} f_j| / ||∇(f_y - max_{j≠y} f_j)|| at the
  input (one gradient per point), or above `hint_threshold` times a distance the caller knows for
  the same point (`hints`: the previous checkpoint's, say). The estimate is off by default: on the
  quick preset the best distance over it ranged over 0.8-1.16 and did not single out the points
  whose distance was worst.
Every further round runs `further` (APGD from the sphere through the best point, FMN from the best
point: ~400 passes per point) on the points still going. Its steps start from the best point
found so far by any attack (refining it), from random points on the sphere through it (other
basins of the decision boundary at the same distance), or from the input with a fresh seed, so a
round can switch attack and start where another attack ended. A point stops when a round improved
its best distance by less than `tol` (relative), or when it has had `max_rounds` rounds. At most
`max_doubt_share` of the points attacked go on to round 2 (those most in doubt: flagged by the
estimate or a hint first, then by spread), which bounds the cost on a model whose attacks disagree
often: with the defaults at most 1200 + 0.3 × 3 × ~400 ≈ 1560 passes per point, ~1.55 × the fast
budget's 1006, and ~1.4-1.5 × in practice since most points stop after round 2 or 3.

Every attack runs through `runner.run_attack`, so every point is verified and every forward and
backward pass counted. Seeds follow from `seed`, the round and the step: a call is repeatable, and
a round is a pure function of (model, x, y, state), so the rounds of a batch can be run as separate
work units and resumed from the state after the last finished one (`AdaptiveState.to_dict`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from robustmargin.attacks.apgd import linear_boundary_estimate
from robustmargin.attacks.cw import batch_view
from robustmargin.attacks.ddn import random_start
from robustmargin.attacks.runner import CountingModel, get_attack, misclassified, run_attack
from robustmargin.errors import UserError

STARTS = ("input", "best", "sphere")


@dataclass(frozen=True)
class Step:
    """One attack of a round: its name, its options, and where it starts ("input", "best", "sphere")."""

    attack: str
    options: Mapping[str, Any] = field(default_factory=dict)
    start: str = "input"


# Chosen on the quick preset (first and last checkpoints, train and test; scripts/bench_attacks.py). A
# long ALMA is what comes nearest the best distance known on most points (at 1000 steps it was within
# 0.1 % of it on ~70 % of points, DDN, FMN and APGD at 1000 on ~15-30 %), and 500 steps keep most of
# that; DDN adds a second, different descent at 100 steps so that the spread means something. On the
# points where the two disagree by more than 2 % (~30 % of points, 8 of the 10 worst), FMN refining
# the best point closes most of the remaining gap and APGD from random points on the sphere through
# it finds other basins; random restarts of DDN there, ALMA from the best point or from the sphere,
# helped less.
ROUND1: tuple[Step, ...] = (
    Step("alma", {"steps": 500}),
    Step("ddn", {"steps": 100}),
)
FURTHER: tuple[Step, ...] = (
    Step("apgd", {"steps": 10, "search_steps": 10}, "sphere"),
    Step("fmn", {"steps": 100}, "best"),
)


@dataclass
class AttackRecord:
    """One attack over all rounds: per point its best distance (NaN where it never ran, inf where it
    ran and failed, 0 misclassified), its best verified point, its cost, and how often it ran."""

    attack: str
    distances: Tensor  # float64 (N,)
    adversarials: Tensor
    runs: Tensor  # int64 (N,): rounds in which it attacked the point
    seconds: float = 0.0
    forwards: int = 0
    backwards: int = 0

    @property
    def attacked(self) -> int:
        """Point-attacks run (a point attacked in two rounds counts twice)."""
        return int(self.runs.sum())


@dataclass
class AdaptiveState:
    """Everything a round needs and produces, on the CPU; `rounds_done` rounds have run."""

    inputs: Tensor  # the points attacked
    distances: Tensor  # float64 (N,): best over every attack and round; 0 misclassified, inf none found
    adversarials: Tensor  # the best verified points (the input where none)
    best_attack: list[str]  # the attack that found the best point ("" where none)
    correct: Tensor  # bool (N,)
    rounds: Tensor  # int64 (N,): rounds each point took (0 for misclassified points)
    active: Tensor  # bool (N,): points the next round attacks
    spread: Tensor  # float64 (N,): round 1's max/min over succeeded attacks; inf if some failed; NaN if none
    estimate: Tensor  # float64 (N,): the linearized boundary distance at the input (NaN misclassified)
    attacks: dict[str, AttackRecord]
    rounds_done: int = 0
    estimate_seconds: float = 0.0
    estimate_forwards: int = 0
    estimate_backwards: int = 0

    @property
    def done(self) -> bool:
        return not bool(self.active.any())

    @property
    def seconds(self) -> float:
        return self.estimate_seconds + sum(r.seconds for r in self.attacks.values())

    @property
    def passes(self) -> int:
        """Forward plus backward passes (samples through the model) of all rounds and the estimate."""
        own = self.estimate_forwards + self.estimate_backwards
        return own + sum(r.forwards + r.backwards for r in self.attacks.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers, strings, lists and dicts (torch.save/load with weights_only)."""
        out = {k: getattr(self, k) for k in ("inputs", "distances", "adversarials", "best_attack", "correct", "rounds",
                                              "active", "spread", "estimate", "rounds_done", "estimate_seconds",
                                              "estimate_forwards", "estimate_backwards")}
        out["attacks"] = {name: {"distances": r.distances, "adversarials": r.adversarials, "runs": r.runs,
                                 "seconds": r.seconds, "forwards": r.forwards, "backwards": r.backwards}
                          for name, r in self.attacks.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AdaptiveState":
        """A state of its own (copied), from `to_dict`'s output."""
        def own(v: Any) -> Any:
            return v.clone() if isinstance(v, Tensor) else list(v) if isinstance(v, list) else v

        attacks = {name: AttackRecord(name, **{k: own(v) for k, v in r.items()}) for name, r in d["attacks"].items()}
        return cls(**{k: own(v) for k, v in d.items() if k != "attacks"}, attacks=attacks)

    def copy(self) -> "AdaptiveState":
        return AdaptiveState.from_dict(self.to_dict())


@dataclass(frozen=True)
class AdaptiveSettings:
    """The rounds' attacks, the doubt thresholds (module note), the stopping rule and the seed."""

    round1: tuple[Step, ...] = ROUND1
    further: tuple[Step, ...] = FURTHER
    max_rounds: int = 4
    spread_threshold: float = 1.02
    estimate_threshold: float | None = None
    hint_threshold: float = 1.05
    max_doubt_share: float = 0.3
    tol: float = 1e-3
    seed: int = 0

    def check(self) -> None:
        if not self.round1:
            raise UserError("the adaptive budget needs at least one attack in round 1")
        if self.max_rounds < 1:
            raise UserError("max_rounds must be at least 1")
        if self.max_rounds > 1 and not self.further:
            raise UserError("further rounds need at least one attack")
        if not (self.spread_threshold >= 1 and self.hint_threshold >= 1 and self.tol >= 0):
            raise UserError("spread_threshold and hint_threshold must be at least 1, tol non-negative")
        if not 0 <= self.max_doubt_share <= 1:
            raise UserError("max_doubt_share must be between 0 and 1")
        if self.estimate_threshold is not None and not self.estimate_threshold > 0:
            raise UserError("estimate_threshold must be positive")
        for step in self.round1 + self.further:
            keywords = _keywords(get_attack(step.attack))
            if step.start not in STARTS:
                raise UserError(f"a step starts from one of {', '.join(STARTS)}, got {step.start!r}")
            if step.start != "input" and "start" not in keywords:
                raise UserError(f"attack {step.attack!r} cannot start from given points")
        if any(step.start != "input" for step in self.round1):
            raise UserError("round 1 steps start from the input (there is no best point yet)")


def step_seed(seed: int, round_: int, index: int) -> int:
    """Round 1 uses `seed` itself (so it repeats the plain attacks); later rounds get seeds of their own."""
    return seed if round_ == 1 else seed + 1_000_003 * (round_ - 1) + 1009 * index


def _starts(step: Step, x: Tensor, best: Tensor, best_dist: Tensor, seed: int) -> Tensor | None:
    """The start points of a step for the points `x` (None: from the input)."""
    if step.start == "input":
        return None
    found = batch_view(torch.isfinite(best_dist), x)
    if step.start == "best":
        return torch.where(found, best, x)
    generator = torch.Generator().manual_seed(seed)
    half_box = torch.maximum(x, 1 - x).flatten(1).norm(dim=1) / 2
    radius = torch.where(torch.isfinite(best_dist), best_dist, half_box.double()).to(x.dtype)
    return x + random_start(x, radius, generator=generator)


def _run_step(model: nn.Module, x: Tensor, y: Tensor, step: Step, starts: Tensor | None, seed: int):
    """run_attack on (x, y), every point in one batch, the first run from `starts` where given."""
    fn = get_attack(step.attack)
    options = dict(step.options)
    if "seed" in _keywords(fn):
        options["seed"] = seed
    if starts is None:
        return run_attack(model, x, y, step.attack, batch_size=len(x), **options)
    # run_attack attacks the points it finds correctly classified; the same test here (same batch)
    # says which, so each gets its own start
    chosen = starts[~misclassified(model, x, y, batch_size=len(x))]

    def started(counter: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
        return fn(counter, inputs, labels, start=chosen, **options)

    return run_attack(model, x, y, started, batch_size=len(x))


def _keywords(fn: Callable[..., Any]) -> set[str]:
    import inspect

    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _record(state: AdaptiveState, name: str, idx: Tensor, result) -> None:
    """Fold one run on the points `idx` into its attack's record and into the best per point."""
    record = state.attacks.get(name)
    if record is None:
        n = len(state.distances)
        record = AttackRecord(name, torch.full((n,), math.nan, dtype=torch.float64), state.inputs.clone(),
                              torch.zeros(n, dtype=torch.int64))
        record.distances[~state.correct] = 0.0
        state.attacks[name] = record
    d = result.distances.to(torch.float64).cpu()
    points = result.adversarials.detach().cpu()
    old = record.distances[idx]
    better = torch.isnan(old) | (d < old)
    record.distances[idx] = torch.where(better, d, old)
    record.adversarials[idx] = torch.where(batch_view(better, points), points, record.adversarials[idx])
    record.runs[idx] += 1
    record.seconds += result.seconds
    record.forwards += result.forwards
    record.backwards += result.backwards
    improved = d < state.distances[idx]
    state.distances[idx] = torch.where(improved, d, state.distances[idx])
    state.adversarials[idx] = torch.where(batch_view(improved, points), points, state.adversarials[idx])
    for i in idx[improved].tolist():
        state.best_attack[i] = name


def start_state(model: nn.Module, x: Tensor, y: Tensor) -> AdaptiveState:
    """The state before round 1: which points are correct, all of those active."""
    with torch.no_grad():
        correct = ~misclassified(model, x, y, batch_size=len(x)).cpu()
    n = len(x)
    distances = torch.where(correct, math.inf, 0.0).to(torch.float64)
    inputs = x.detach().cpu()
    return AdaptiveState(inputs=inputs, distances=distances, adversarials=inputs.clone(), best_attack=[""] * n,
                         correct=correct, rounds=torch.zeros(n, dtype=torch.int64), active=correct.clone(),
                         spread=torch.full((n,), math.nan, dtype=torch.float64),
                         estimate=torch.full((n,), math.nan, dtype=torch.float64), attacks={})


def _spread(state: AdaptiveState, names: Sequence[str]) -> Tensor:
    d = torch.stack([state.attacks[name].distances for name in names])
    ok = torch.isfinite(d) & (d > 0)
    hi = torch.where(ok, d, -math.inf).amax(0)
    lo = torch.where(ok, d, math.inf).amin(0)
    spread = torch.where(ok.any(0), hi / lo, math.nan)
    return torch.where(ok.any(0) & ~ok.all(0) & state.correct, math.inf, spread)


def _estimate(model: nn.Module, x: Tensor, y: Tensor, state: AdaptiveState) -> None:
    """The linearized boundary distance at each correctly classified input (one gradient each), counted."""
    idx = torch.nonzero(state.correct).flatten()
    counter = CountingModel(model)
    t0 = time.perf_counter()
    part = idx.to(x.device)
    state.estimate[idx] = linear_boundary_estimate(counter, x[part], y[part]).double().cpu()
    state.estimate_seconds += time.perf_counter() - t0
    state.estimate_forwards += counter.forwards
    state.estimate_backwards += counter.backwards


def _most_in_doubt(doubt: Tensor, priority: Tensor, limit: int) -> Tensor:
    """`doubt`, cut to the `limit` points of highest priority (ties: the earlier point first)."""
    order = torch.argsort(-priority.masked_fill(~doubt, -math.inf), stable=True)
    keep = torch.zeros_like(doubt)
    keep[order[:limit]] = True
    return doubt & keep


def adaptive_round(model: nn.Module, x: Tensor, y: Tensor, state: AdaptiveState, settings: AdaptiveSettings,
                   hints: Tensor | None = None) -> AdaptiveState:
    """Run the next round on the active points and decide which go on; returns a new state (the
    one given is left as it was)."""
    state = state.copy()
    if state.done:
        return state
    round_ = state.rounds_done + 1
    idx = torch.nonzero(state.active).flatten()
    before = state.distances[idx].clone()
    steps = settings.round1 if round_ == 1 else settings.further
    xs, ys = x[idx.to(x.device)], y[idx.to(x.device)]
    for j, step in enumerate(steps):
        seed = step_seed(settings.seed, round_, j)
        starts = _starts(step, xs, state.adversarials[idx].to(xs), state.distances[idx].to(xs.device), seed)
        _record(state, step.attack, idx, _run_step(model, xs, ys, step, starts, seed))
    state.rounds[idx] += 1
    state.rounds_done = round_
    after = state.distances[idx]
    if round_ == 1:
        names = list(dict.fromkeys(step.attack for step in steps))
        state.spread = _spread(state, names)
        spread = state.spread[idx].nan_to_num(math.inf)  # nothing found: as much in doubt as a failure
        doubt = spread > settings.spread_threshold
        flagged = torch.zeros_like(doubt)  # large against an estimate: first in line, as failures are
        if settings.estimate_threshold is not None:
            _estimate(model, x, y, state)
            flagged |= after > settings.estimate_threshold * state.estimate[idx]
        if hints is not None:
            hint = torch.as_tensor(hints, dtype=torch.float64).cpu()[idx]
            flagged |= torch.isfinite(hint) & (hint > 0) & (after > settings.hint_threshold * hint)
        go_on = _most_in_doubt(doubt | flagged, torch.where(flagged, math.inf, spread),
                               math.ceil(settings.max_doubt_share * len(idx)))
    else:
        improved = torch.isinf(before) & torch.isfinite(after) | (after < before * (1 - settings.tol))
        go_on = improved
    state.active[idx] = go_on & (round_ < settings.max_rounds)
    return state


def adaptive_attack(model: nn.Module, x: Tensor, y: Tensor, settings: AdaptiveSettings | None = None, *,
                    hints: Tensor | None = None, **overrides: Any) -> AdaptiveState:
    """Attack every correctly classified point of (x, y) with the adaptive budget; the final state.

    `overrides` replace fields of the settings (e.g. `seed=1, max_rounds=3`).
    """
    settings = settings or AdaptiveSettings()
    if overrides:
        unknown = sorted(set(overrides) - set(AdaptiveSettings.__dataclass_fields__))
        if unknown:
            raise UserError(f"the adaptive budget has no setting {unknown[0]!r}")
        settings = AdaptiveSettings(**{**settings.__dict__, **overrides})
    settings.check()
    if x.dim() < 2 or y.shape != (len(x),):
        raise UserError(f"expected inputs (N, ...) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    state = start_state(model, x, y)
    while not state.done:
        state = adaptive_round(model, x, y, state, settings, hints)
    return state
