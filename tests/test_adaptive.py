"""The adaptive budget (attacks/adaptive.py) on tiny models with short attacks: repeatable for a seed, never
worse than its round 1, more rounds exactly where its rules say, costs that add up to the attacks' own
step counts, verified adversarials, resumable between rounds; and the `start` option it builds on."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from robustmargin.attacks import alma, apgd, ddn, fmn
from robustmargin.attacks.adaptive import (AdaptiveSettings, AdaptiveState, Step, adaptive_attack, adaptive_round,
                                           start_state)
from robustmargin.errors import UserError

SHORT = AdaptiveSettings(
    round1=(Step("ddn", {"steps": 40, "init_epsilon": 0.2}), Step("alma", {"steps": 40}),
            Step("apgd", {"steps": 5, "search_steps": 5})),
    further=(Step("ddn", {"steps": 20}, "sphere"), Step("fmn", {"steps": 20}, "best"),
             Step("apgd", {"steps": 4, "search_steps": 3}, "sphere")),
    max_rounds=4, spread_threshold=1.5,  # short attacks disagree a lot: 1.5 leaves some points agreeing
    max_doubt_share=1.0)
# forward (= backward) samples per point of one call, from each attack's loop
PASSES = {("ddn", "input"): 40, ("ddn", "sphere"): 20, ("alma", "input"): 40, ("fmn", "best"): 20,
          ("apgd", "input"): 5 * 5 + 1, ("apgd", "sphere"): 4 * 3 + 1}


def mlp(seed: int = 0) -> nn.Module:
    """A ReLU MLP centred on the box's centre, so that its four classes share the box."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 24, bias=False), nn.ReLU(),
                          nn.Linear(24, 4, bias=False)).eval()
    with torch.no_grad():
        model[0].bias.copy_(-0.5 * model[0].weight.sum(1))
    return model


@pytest.fixture(scope="module")
def problem():
    model = mlp()
    x = torch.rand(16, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 4  # two misclassified points: distance 0, never attacked
    return model, x, y


@pytest.fixture(scope="module")
def result(problem):
    model, x, y = problem
    return adaptive_attack(model, x, y, SHORT)


def test_repeatable_for_a_seed_and_seeded(problem, result):
    model, x, y = problem
    again = adaptive_attack(model, x, y, SHORT)
    assert torch.equal(again.distances, result.distances) and torch.equal(again.adversarials, result.adversarials)
    assert torch.equal(again.rounds, result.rounds) and again.best_attack == result.best_attack
    assert again.passes == result.passes
    other = adaptive_attack(model, x, y, SHORT, seed=5)
    assert not torch.equal(other.adversarials, result.adversarials)


def test_never_worse_than_round_one(problem, result):
    model, x, y = problem
    first = adaptive_attack(model, x, y, SHORT, max_rounds=1)
    assert (first.rounds == first.correct.long()).all()
    assert (result.distances <= first.distances).all()
    assert (result.rounds.max() > 1) and bool((result.distances < first.distances).any())


def test_rounds_follow_the_rules(problem, result):
    """Round 2 goes exactly to the points whose round-1 attacks disagree; later rounds only to points the
    round before improved by at least `tol`; misclassified points get none."""
    assert (result.rounds[:2] == 0).all() and (result.distances[:2] == 0).all()
    attacked = result.correct
    doubt = ~(result.spread <= SHORT.spread_threshold) & attacked
    agree = ~doubt & attacked
    assert doubt.any() and agree.any()
    assert (result.rounds[agree] == 1).all()
    assert (result.rounds[doubt] >= 2).all()
    assert result.rounds.max() <= SHORT.max_rounds

    model, x, y = problem
    state = start_state(model, x, y)
    for round_ in range(1, SHORT.max_rounds + 1):
        before = state.distances.clone()
        going = state.active.clone()
        state = adaptive_round(model, x, y, state, SHORT)
        if round_ > 1:
            improved = state.distances < before * (1 - SHORT.tol)
            assert torch.equal(state.active, going & improved & (round_ < SHORT.max_rounds))
    assert torch.equal(state.rounds, result.rounds)


def test_spread_counts_a_failure_as_disagreement():
    """A point where one round-1 attack fails and another succeeds is in doubt (spread inf)."""
    model = mlp(2)
    x = torch.rand(6, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x).argmax(1)
    weak = AdaptiveSettings(round1=(Step("ddn", {"steps": 20}),
                                    Step("apgd", {"steps": 1, "search_steps": 1, "init_epsilon": 1e-6})),
                            further=(Step("fmn", {"steps": 10}, "best"),), max_rounds=2, spread_threshold=1.05,
                            max_doubt_share=1.0)
    state = adaptive_attack(model, x, y, weak)
    assert torch.isinf(state.spread).all() and (state.rounds == 2).all()


def test_hints_and_the_local_estimate_put_points_in_doubt(problem):
    model, x, y = problem
    agreeing = dict(spread_threshold=1e9, max_rounds=2)
    plain = adaptive_attack(model, x, y, SHORT, **agreeing)
    assert (plain.rounds == plain.correct.long()).all()
    hints = plain.distances.clone()
    hints[2:6] = plain.distances[2:6] / 2  # a previous checkpoint found half the distance on these
    hinted = adaptive_attack(model, x, y, SHORT, hints=hints, **agreeing)
    assert hinted.rounds[2:6].tolist() == [2] * 4 and (hinted.rounds[6:] == 1).all()
    estimated = adaptive_attack(model, x, y, SHORT, estimate_threshold=1e-9, **agreeing)
    assert (estimated.rounds == 2 * estimated.correct.long()).all()
    assert torch.isfinite(estimated.estimate[2:]).all() and (estimated.estimate[2:] > 0).all()
    assert estimated.estimate_forwards == estimated.estimate_backwards == int(estimated.correct.sum())


def test_costs_add_up(result):
    """Each attack's forward and backward samples equal its per-call step count times the point-calls
    recorded for it; the total is their sum."""
    calls = {}
    for round_ in range(1, SHORT.max_rounds + 1):
        points = int((result.rounds >= round_).sum())
        for step in SHORT.round1 if round_ == 1 else SHORT.further:
            calls[step.attack] = calls.get(step.attack, 0) + points * PASSES[(step.attack, step.start)]
    for name, record in result.attacks.items():
        assert record.forwards == record.backwards == calls[name], name
    runs = {name: r.runs for name, r in result.attacks.items()}
    assert torch.equal(runs["ddn"], result.rounds) and torch.equal(runs["alma"], result.correct.long())
    assert torch.equal(runs["fmn"], (result.rounds - 1).clamp_min(0))
    assert result.passes == sum(2 * v for v in calls.values())
    assert result.seconds > 0 and all(r.seconds > 0 for r in result.attacks.values())


def test_adversarials_are_verified(problem, result):
    model, x, y = problem
    records = [(result.distances, result.adversarials)] + [(r.distances, r.adversarials)
                                                           for r in result.attacks.values()]
    for k, (distances, points) in enumerate(records):
        found = torch.isfinite(distances) & (distances > 0)
        assert found.sum() >= (10 if k == 0 else 1)
        with torch.no_grad():
            assert (model(points[found]).argmax(1) != y[found]).all()
        assert points.min() >= 0 and points.max() <= 1
        assert torch.equal(distances[found], (points[found].double() - x[found].double()).norm(dim=1))
    best = torch.stack([r.distances for r in result.attacks.values()]).nan_to_num(math.inf).amin(0)
    assert torch.equal(best, result.distances)
    for i, name in enumerate(result.best_attack):
        if result.correct[i] and math.isfinite(result.distances[i]):
            assert result.attacks[name].distances[i] == result.distances[i]
        else:
            assert name == ""


def test_resumes_from_the_state_after_any_round(problem, result):
    model, x, y = problem
    state = start_state(model, x, y)
    while not state.done:
        state = adaptive_round(model, x, y, state, SHORT)
        buffer = io.BytesIO()
        torch.save(state.to_dict(), buffer)
        buffer.seek(0)
        state = AdaptiveState.from_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(state.distances, result.distances) and torch.equal(state.rounds, result.rounds)
    assert {n: r.forwards for n, r in state.attacks.items()} == {n: r.forwards for n, r in result.attacks.items()}


def test_bad_settings_are_user_errors(problem):
    model, x, y = problem
    for bad in ({"max_rounds": 0}, {"spread_threshold": 0.5}, {"round1": ()}, {"tol": -1.0},
                {"further": (Step("cw", {}, "sphere"),)}, {"further": (Step("ddn", {}, "nowhere"),)},
                {"round1": (Step("ddn", {}, "best"),)}, {"estimate_threshold": 0.0}, {"rounds": 3},
                {"max_doubt_share": 1.5}):
        with pytest.raises(UserError):
            adaptive_attack(model, x[:4], y[:4], SHORT, **bad)


@pytest.mark.parametrize("attack,options", [(ddn, {"steps": 10}), (fmn, {"steps": 10}), (alma, {"steps": 10}),
                                            (apgd, {"steps": 3, "search_steps": 3})])
def test_a_start_at_an_adversarial_is_never_lost(problem, attack, options):
    """The first run evaluates its start: the result is never farther than an adversarial start."""
    model, x, y = problem
    x, y = x[2:], y[2:]
    far = ddn(model, x, y, steps=30)
    far = x + 1.5 * (far - x)  # past the boundary along the same ray, still adversarial here
    with torch.no_grad():
        adversarial = model(far.clamp(0, 1)).argmax(1) != y
    assert adversarial.sum() >= 8
    got = attack(model, x, y, start=far.clamp(0, 1), **options)
    d_start = (far.clamp(0, 1) - x).norm(dim=1)
    d_got = (got - x).norm(dim=1)
    assert (d_got[adversarial] <= d_start[adversarial]).all()
    with pytest.raises(UserError, match="shape"):
        attack(model, x, y, start=far[:3], **options)


def test_a_round_leaves_the_state_it_was_given(problem):
    model, x, y = problem
    state = adaptive_round(model, x, y, start_state(model, x, y), SHORT)
    saved = state.to_dict()
    copy = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in saved.items() if k != "attacks"}
    later = adaptive_round(model, x, y, state, SHORT)
    assert later.rounds_done == 2 and state.rounds_done == 1
    for key, value in copy.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(getattr(state, key), value, rtol=0, atol=0, equal_nan=True)
        else:
            assert getattr(state, key) == value, key


def test_round_two_goes_to_at_most_a_share_of_the_points_those_most_in_doubt(problem):
    model, x, y = problem
    share = adaptive_attack(model, x, y, SHORT, max_doubt_share=0.25, max_rounds=2, spread_threshold=1.0)
    attacked = int(share.correct.sum())
    second = share.rounds == 2
    assert int(second.sum()) == math.ceil(0.25 * attacked)
    assert share.spread[second].min() >= share.spread[share.correct & ~second].max()
    none = adaptive_attack(model, x, y, SHORT, max_doubt_share=0.0)
    assert (none.rounds == none.correct.long()).all()
