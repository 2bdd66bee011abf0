"""Benchmark the attacks on a run's checkpoints; prints one JSON object.

(a) our CW vs foolbox's CW with identical reduced hyperparameters: median per-sample
    distance ratio (target 0.99–1.01) and wall-time ratio (target ours ≤ 0.5× foolbox);
(b) the fast default ensemble (DDN + FMN + short CW, per-sample minimum) vs foolbox's CW
    at its reference settings (9 × 10000 steps, abort early): median distance ratio
    (target ≤ 1.01) and time ratio (target ≤ 1/20). Foolbox's reference CW is slow, so it
    runs on the first `--reference-n` points of each checkpoint (said so in the JSON), and
    the time ratio compares cost per attacked point.

(c) the tail (`--parts c`, the default): per attack and budget (k × the attack's fast steps, or
    its fast steps with restarts), the per-point ratio of its distance to the best distance any
    run found (every attack at 10 × its fast steps among them): median, 90th percentile, worst,
    share within 1 %, with forward/backward passes per attacked point and seconds; on the run's
    first and last checkpoints, train and test. It then names the cheapest ensemble (at most one
    budget per attack, per-sample minimum) whose 90th-percentile ratio is <= 1.01 and worst
    <= 1.05, within 3 x the cost of the previous fast default (DDN + FMN, 100 steps). With --out it writes tail.json and
    tail.md there (and nothing anywhere else).

(d) the budgets (`--parts d`): fast, reference, strong and adaptive (attacks/adaptive.py), each per
    point as a ratio to the best distance any configuration found whose cost is at most 10 x the fast
    budget's (the four budgets, each attack at 10 x its fast steps, DDN and FMN with 10 restarts):
    median, 90th percentile, worst, share within 1 % and 0.1 %, forward+backward passes per attacked
    point and seconds, the adaptive budget's rounds per point; on the run's first and last checkpoints,
    train and test, or (`--bn-cnn`) on a small BatchNorm CNN trained here on the embedded digits.
    `--strong-n K` runs the strong budget (CW at its reference settings) on the first K points of
    each group only. With --out it writes budgets.json and budgets.md there.

Usage: python scripts/bench_attacks.py --run DIR [--n 100] [--out DIR]       (part c)
       python scripts/bench_attacks.py --run DIR --parts d --n 25 [--strong-n 5] [--out DIR]
       python scripts/bench_attacks.py --bn-cnn --parts d --n 50
       python scripts/bench_attacks.py --run DIR --parts a,b [--split test]
       python scripts/bench_attacks.py --selftest --parts a,b   (trains a small CNN itself)
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustmargin.attacks.adaptive import adaptive_attack
from robustmargin.attacks.runner import BUDGETS, ENSEMBLE, ENSEMBLES, AttackResult, budget_options, fast_options, run_attack

TAIL_ATTACKS = ("ddn", "fmn", "alma", "apgd")
PREVIOUS_DEFAULT = ("ddn", "fmn")  # the fast default before the tail benchmark: 100 steps each
REFERENCE_FACTOR = 10
TARGET_P90, TARGET_WORST, MAX_COST_FACTOR = 1.01, 1.05, 3.0

CW_REDUCED = {"steps": 200, "binary_search_steps": 5}


def selftest_models(n: int) -> tuple[list[tuple[str, nn.Module]], torch.Tensor, torch.Tensor]:
    """A small bias-free CNN trained briefly on embedded MNIST; a second copy with logits ×1e3
    (same decision boundary) stands in for a long-trained checkpoint's huge logits."""
    from robustmargin.config import config_from_dict
    from robustmargin.data import load_data
    from robustmargin.models import ModelSpec, build_model

    splits = load_data(config_from_dict({"data": {"n_train": 1000, "n_test": max(n, 100)}}).data)
    x, y = splits["train"]
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="cnn", bias="none", width=0.25))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(8):
        for i in range(0, len(x), 50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 50]), y[i:i + 50]).backward()
            opt.step()
    model.eval()
    scaled = build_model(model.spec)
    scaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        scaled.weight_layers[-1].weight.mul_(1e3)
    xt, yt = splits["test"]
    return [("selftest", model), ("selftest-x1e3", scaled.eval())], xt[:n], yt[:n]


def run_models(run_dir: Path, split: str, n: int, names: str) -> tuple[list[tuple[str, nn.Module]], torch.Tensor,
                                                                      torch.Tensor]:
    from robustmargin.checkpoints import load_checkpoint
    from robustmargin.rundir import read_index
    from robustmargin.rundir import load_split

    index = read_index(run_dir)
    if names != "all":
        index = index[index["name"].isin(names.split(","))]
    models = [(str(r.name), load_checkpoint(run_dir / "checkpoints" / str(r.file))[0]) for r in index.itertuples()]
    x, y = load_split(run_dir, split)
    return models, x[:n], y[:n]


def cost(results: list[AttackResult]) -> dict[str, Any]:
    return {"seconds": round(sum(r.seconds for r in results), 3), "forwards": sum(r.forwards for r in results),
            "backwards": sum(r.backwards for r in results), "attacked_points": sum(r.attacked for r in results)}


def median_ratio(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, Any]:
    """Median of per-sample ratios over points attacked and solved by both; failures counted apart."""
    attacked = (ours > 0) | (theirs > 0)
    both = attacked & torch.isfinite(ours) & torch.isfinite(theirs)
    ratio = ours[both] / theirs[both]
    return {
        "median_distance_ratio": round(float(ratio.median()), 5) if len(ratio) else None,
        "ratio_p10_p90": [round(float(ratio.quantile(q)), 4) for q in (0.1, 0.9)] if len(ratio) else None,
        "points_compared": int(both.sum()),
        "failures_ours": int((attacked & torch.isinf(ours)).sum()),
        "failures_theirs": int((attacked & torch.isinf(theirs)).sum()),
    }


def budgets(factors: list[float], restarts: list[int]) -> list[tuple[str, float, int]]:
    """(label, steps factor, restarts) of every budget measured; the reference factor last."""
    out = [(f"{f:g}x", f, 1) for f in factors] + [(f"1x-r{r}", 1.0, r) for r in restarts]
    return out + [(f"{REFERENCE_FACTOR}x", float(REFERENCE_FACTOR), 1)]


def budget_settings(name: str, factor: float, restarts: int) -> dict[str, Any]:
    options = fast_options(name)
    options.pop("restarts", None)
    options["steps"] = max(1, round(options["steps"] * factor))
    if restarts > 1:
        options["restarts"] = restarts
    return options


def tail_stats(distances: torch.Tensor, best: torch.Tensor) -> dict[str, Any]:
    """Ratio to the best known distance over the attacked points (failures count as inf)."""
    keep = (best > 0) & torch.isfinite(best)
    ratio = (distances[keep] / best[keep]).double()
    finite = ratio[torch.isfinite(ratio)]
    return {
        "median": float(ratio.quantile(0.5, interpolation="higher")),
        "p90": float(ratio.quantile(0.9, interpolation="higher")),
        "worst": float(ratio.max()), "within_1pct": float((ratio <= 1.01).double().mean()),
        "failures": int(len(ratio) - len(finite)), "points": int(len(ratio)),
    }


def tail_part(models, data, n: int, factors: list[float], restarts: list[int]) -> dict[str, Any]:
    """Run every attack at every budget on every (checkpoint, split); rank budgets and ensembles."""
    plans = [(name, label, budget_settings(name, f, r)) for name in TAIL_ATTACKS for label, f, r in
             budgets(factors, restarts)]
    groups = []
    for (ckpt, model), (split, (x, y)) in itertools.product(models, data.items()):
        x, y = x[:n], y[:n]
        runs = {}
        for name, label, options in plans:
            r = run_attack(model, x, y, name, batch_size=len(x), **options)
            runs[(name, label)] = r
            print(f"{ckpt} {split} {name}@{label}: {r.seconds:.1f} s", file=sys.stderr)
        best = torch.stack([r.distances for r in runs.values()]).amin(0)
        groups.append({"checkpoint": ckpt, "split": split, "runs": runs, "best": best})
    best = torch.cat([g["best"] for g in groups])

    def pooled(key) -> tuple[torch.Tensor, float, float, int]:
        dist = torch.cat([g["runs"][key].distances for g in groups])
        attacked = sum(g["runs"][key].attacked for g in groups)
        passes = sum(g["runs"][key].forwards + g["runs"][key].backwards for g in groups)
        return dist, passes / max(attacked, 1), sum(g["runs"][key].seconds for g in groups), attacked

    rows = []
    for name, label, options in plans:
        dist, passes, seconds, attacked = pooled((name, label))
        per_group = {f"{g['checkpoint']}/{g['split']}": tail_stats(g["runs"][(name, label)].distances, g["best"])
                     for g in groups}
        rows.append({"attack": name, "budget": label, "options": options, **tail_stats(dist, best),
                     "passes_per_point": passes, "seconds": round(seconds, 2), "attacked": attacked,
                     "per_group": per_group})

    previous_cost = sum(pooled((name, "1x"))[1] for name in PREVIOUS_DEFAULT)
    choices = [[None] + [(name, label) for label, f, r in budgets(factors, restarts) if f < REFERENCE_FACTOR]
               for name in TAIL_ATTACKS]
    ensembles = []
    for combo in itertools.product(*choices):
        keys = [k for k in combo if k is not None]
        if not keys:
            continue
        cost_ = sum(pooled(k)[1] for k in keys)
        dist = torch.stack([pooled(k)[0] for k in keys]).amin(0)
        ensembles.append({"members": [f"{a}@{b}" for a, b in keys], "passes_per_point": cost_,
                          "cost_vs_previous": cost_ / previous_cost, **tail_stats(dist, best)})
    ensembles.sort(key=lambda e: e["passes_per_point"])
    affordable = [e for e in ensembles if e["cost_vs_previous"] <= MAX_COST_FACTOR + 1e-9]
    meets = [e for e in affordable if e["p90"] <= TARGET_P90 and e["worst"] <= TARGET_WORST]
    chosen = meets[0] if meets else min(affordable, key=lambda e: (e["p90"], e["worst"], e["passes_per_point"]))

    def find(members: list[str]) -> dict[str, Any] | None:
        return next((e for e in ensembles if sorted(e["members"]) == sorted(members)), None)

    previous = find([f"{a}@1x" for a in PREVIOUS_DEFAULT])
    restarts_of = {a: fast_options(a).get("restarts", 1) for a in ENSEMBLE}
    current = find([f"{a}@1x" if r == 1 else f"{a}@1x-r{r}" for a, r in restarts_of.items()])
    return {
        "reference": f"per point, the smallest distance any run found (every attack at {REFERENCE_FACTOR}x its "
                     "fast steps among them)",
        "groups": [f"{g['checkpoint']}/{g['split']}" for g in groups], "points_per_group": n,
        "rows": rows, "previous_default": previous, "current_default": current,
        "per_point": {"best": [float(v) for v in best],
                      **{f"{a}@{b}": [float(v) for v in pooled((a, b))[0]] for a, b, _ in plans}}, "chosen": chosen, "chosen_meets_target": bool(meets),
        "targets": {"p90_max": TARGET_P90, "worst_max": TARGET_WORST, "cost_vs_previous_max": MAX_COST_FACTOR},
        "cheapest_meeting_target": meets[:5],
        "best_affordable_by_p90": sorted(affordable, key=lambda e: (e["p90"], e["worst"]))[:5],
    }


def bn_cnn_models(n: int, epochs: int = 4) -> tuple[list[tuple[str, nn.Module]], dict[str, tuple[torch.Tensor,
                                                                                                  torch.Tensor]]]:
    """A small CNN with BatchNorm (not homogeneous: the attacks must not rely on it), trained for a few
    epochs on 2000 embedded MNIST digits; its train and test points."""
    from robustmargin.config import config_from_dict
    from robustmargin.data import load_data

    splits = load_data(config_from_dict({"data": {"n_train": 2000, "n_test": max(n, 200)}}).data)
    x, y = splits["train"]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 50):
            batch = order[i:i + 50]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    return [("bn-cnn", model.eval())], {"train": splits["train"], "test": splits["test"]}


def budget_runs() -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """The runs of each budget, as the attack stage runs them (runner.BUDGETS and ENSEMBLES)."""
    return {budget: [(name, budget_options(name, budget)) for name in ENSEMBLES[budget]] for budget in BUDGETS}


def pool_runs() -> list[tuple[str, dict[str, Any]]]:
    """The further single runs of the pool: each attack at 10 x its fast steps, DDN and FMN with 10 restarts."""
    runs = []
    for name in TAIL_ATTACKS:
        options = fast_options(name)
        options.pop("restarts", None)
        options["steps"] *= REFERENCE_FACTOR
        runs.append((name, options))
    return runs + [(name, budget_options(name, "strong")) for name in ("ddn", "fmn")]


def _key(name: str, options: dict[str, Any]) -> str:
    """The attack with all its effective options: equal runs under different budgets run once."""
    import inspect

    from robustmargin.attacks.runner import get_attack

    params = inspect.signature(get_attack(name)).parameters.values()
    effective = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return name + json.dumps({**effective, **options}, sort_keys=True)


def budgets_part(models, data, n: int, strong_n: int) -> dict[str, Any]:
    """Every budget and pool run on every (checkpoint, split); ratios to the pool's best per point."""
    plans = budget_runs()
    groups = []
    for (ckpt, model), (split, (x, y)) in itertools.product(models, data.items()):
        x, y = x[:n], y[:n]
        runs: dict[str, AttackResult] = {}
        for budget, items in [(b, r) for b, r in plans.items() if b != "strong"] + [("pool", pool_runs())]:
            for name, options in items:
                if _key(name, options) not in runs:
                    runs[_key(name, options)] = run_attack(model, x, y, name, batch_size=len(x), **options)
                    print(f"{ckpt} {split} {_key(name, options)}: {runs[_key(name, options)].seconds:.1f} s",
                          file=sys.stderr)
        k = min(strong_n, len(x))
        strong = [run_attack(model, x[:k], y[:k], name, batch_size=max(k, 1), **options)
                  for name, options in plans["strong"] if name == "cw"] if k else []
        print(f"{ckpt} {split} strong cw on {k} points: {sum(r.seconds for r in strong):.1f} s", file=sys.stderr)
        state = adaptive_attack(model, x, y)
        print(f"{ckpt} {split} adaptive: {state.seconds:.1f} s, rounds {torch.bincount(state.rounds).tolist()}",
              file=sys.stderr)
        groups.append({"label": f"{ckpt}/{split}", "runs": runs, "strong_cw": strong, "adaptive": state, "k": k})

    def config(budget: str, g) -> tuple[torch.Tensor, float, float, int]:
        """Per-point distance, passes per attacked point, seconds and attacked points of a budget on a group."""
        if budget == "adaptive":
            st = g["adaptive"]
            attacked = int(st.correct.sum())
            return st.distances, st.passes / max(attacked, 1), st.seconds, attacked
        items = [g["runs"][_key(name, options)] for name, options in plans[budget] if name != "cw" or budget != "strong"]
        if budget == "strong":
            k = g["k"]
            dist = torch.stack([r.distances[:k] for r in items] + [r.distances for r in g["strong_cw"]]).amin(0)
            parts = items + g["strong_cw"]
            passes = sum((r.forwards + r.backwards) / max(r.attacked, 1) for r in parts)
            # the restarted runs' seconds on the strong subset's share of the points
            seconds = sum(r.seconds * k / max(len(r.distances), 1) for r in items) + sum(r.seconds for r in g["strong_cw"])
            return dist, passes, seconds, int(items[0].correct[:k].sum())
        dist = torch.stack([r.distances for r in items]).amin(0)
        return dist, sum((r.forwards + r.backwards) / max(r.attacked, 1) for r in items), \
            sum(r.seconds for r in items), items[0].attacked

    names = ["fast", "reference", "adaptive"] + (["strong"] if any(g["k"] for g in groups) else [])
    fast_passes = sum(config("fast", g)[1] * config("fast", g)[3] for g in groups) / sum(config("fast", g)[3] for g in groups)
    limit = REFERENCE_FACTOR * fast_passes
    bests, pooled_from = [], set()
    for g in groups:
        candidates = []
        for key, r in g["runs"].items():
            if (r.forwards + r.backwards) / max(r.attacked, 1) <= limit:
                candidates.append(r.distances)
                pooled_from.add(key)
        for budget in names:
            d, passes, _, _ = config(budget, g)
            if passes <= limit and budget != "strong":
                candidates.append(d)
                pooled_from.add(budget)
        best = torch.stack(candidates).amin(0)
        if g["k"] and config("strong", g)[1] <= limit:
            best[:g["k"]] = torch.minimum(best[:g["k"]], config("strong", g)[0])
            pooled_from.add("strong")
        bests.append(best)

    rows = {}
    for budget in names:
        dists, refs, passes, seconds, attacked, per_group = [], [], 0.0, 0.0, 0, {}
        for g, best in zip(groups, bests):
            d, p, sec, att = config(budget, g)
            ref = best[:len(d)]
            dists.append(d)
            refs.append(ref)
            passes += p * att
            seconds += sec
            attacked += att
            per_group[g["label"]] = tail_stats(d, ref)
        d, ref = torch.cat(dists), torch.cat(refs)
        row = {**tail_stats(d, ref), "within_0.1pct": _within(d, ref, 1.001), "passes_per_point": passes / max(attacked, 1),
               "cost_vs_fast": passes / max(attacked, 1) / fast_passes, "seconds": round(seconds, 2),
               "per_group": per_group}
        if budget == "strong":
            row["points_per_group"] = [g["k"] for g in groups]
        rows[budget] = row
    rounds = torch.cat([g["adaptive"].rounds[g["adaptive"].correct] for g in groups])
    rows["adaptive"]["rounds_histogram"] = torch.bincount(rounds).tolist()
    rows["adaptive"]["mean_rounds"] = float(rounds.double().mean())
    return {
        "reference": f"per point, the smallest distance any configuration found at most {REFERENCE_FACTOR}x the fast "
                     f"budget's passes per point ({limit:.0f})",
        "pooled": sorted(pooled_from), "groups": [g["label"] for g in groups], "points_per_group": n,
        "budgets": rows, "runs": {budget: [f"{a} {json.dumps(o, sort_keys=True)}" for a, o in r]
                                  for budget, r in plans.items()},
        "targets": {"median_max": 1.001, "p90_max": 1.01, "worst_max": 1.05, "adaptive_cost_vs_fast_max": 1.5},
    }


def _within(d: torch.Tensor, ref: torch.Tensor, factor: float) -> float:
    keep = (ref > 0) & torch.isfinite(ref)
    return float((d[keep] <= factor * ref[keep]).double().mean())


def budgets_markdown(part: dict[str, Any]) -> str:
    lines = ["| budget | passes/point | vs fast | seconds | median | p90 | worst | within 1 % | within 0.1 % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in part["budgets"].items():
        lines.append(f"| {name} | {r['passes_per_point']:.0f} | {r['cost_vs_fast']:.2f} | {r['seconds']:.1f} | "
                     f"{r['median']:.4f} | {r['p90']:.4f} | {r['worst']:.4f} | {r['within_1pct']:.2f} | "
                     f"{r['within_0.1pct']:.2f} |")
    a = part["budgets"]["adaptive"]
    lines += ["", f"adaptive rounds per attacked point (count of points with 0, 1, 2, ... rounds): "
                  f"{a['rounds_histogram']}, mean {a['mean_rounds']:.2f}"]
    return "\n".join(lines) + "\n"


def tail_markdown(tail: dict[str, Any]) -> str:
    lines = ["| attack | budget | passes/point | seconds | median | p90 | worst | within 1 % |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in tail["rows"]:
        lines.append(f"| {r['attack']} | {r['budget']} | {r['passes_per_point']:.0f} | {r['seconds']:.1f} | "
                     f"{r['median']:.4f} | {r['p90']:.4f} | {r['worst']:.4f} | {r['within_1pct']:.2f} |")
    lines += ["", "| ensemble | passes/point | cost vs previous | median | p90 | worst | within 1 % |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    shown = (("previous default", tail["previous_default"]), ("current default", tail["current_default"]),
             ("chosen", tail["chosen"]))
    for label, e in ((label, e) for label, e in shown if e is not None):
        lines.append(f"| {label}: {' + '.join(e['members'])} | {e['passes_per_point']:.0f} | "
                     f"{e['cost_vs_previous']:.2f} | {e['median']:.4f} | {e['p90']:.4f} | {e['worst']:.4f} | "
                     f"{e['within_1pct']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="run directory with checkpoints")
    src.add_argument("--selftest", action="store_true", help="train a small CNN here instead of reading a run")
    src.add_argument("--bn-cnn", action="store_true",
                     help="part d: train a small BatchNorm CNN here on the embedded digits instead of reading a run")
    p.add_argument("--n", type=int, default=100, help="points per checkpoint (default 100)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--checkpoints", default="all")
    p.add_argument("--reference-n", type=int, default=10,
                   help="points per checkpoint for foolbox's 9x10000-step CW (default 10)")
    p.add_argument("--cw-steps", type=int, default=CW_REDUCED["steps"])
    p.add_argument("--cw-search-steps", type=int, default=CW_REDUCED["binary_search_steps"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timings)")
    p.add_argument("--skip", default="", help="comma list of parts to skip")
    p.add_argument("--parts", default="c", help="comma list of parts to run: a,b,c (default c)")
    p.add_argument("--factors", default="1,3", help="part c: step multiples of the fast budget (default 1,3)")
    p.add_argument("--restarts", default="3", help="part c: restart counts at 1x steps (default 3)")
    p.add_argument("--out", type=Path, help="parts c, d: write tail.* or budgets.* into this directory")
    p.add_argument("--strong-n", type=int, default=None,
                   help="part d: points per group for the strong budget's reference CW (default --n; 0 skips it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.bn_cnn:
        models, bn_data = bn_cnn_models(args.n)
        x, y = bn_data[args.split]
    elif args.selftest:
        models, x, y = selftest_models(args.n)
    else:
        models, x, y = run_models(args.run, args.split, args.n, args.checkpoints)
    reduced = {"steps": args.cw_steps, "binary_search_steps": args.cw_search_steps}
    out: dict[str, Any] = {
        "setup": {"source": "bn-cnn" if args.bn_cnn else "selftest" if args.selftest else str(args.run), "split": args.split, "n": len(x),
                  "checkpoints": [name for name, _ in models], "threads": args.threads,
                  "torch": torch.__version__, "device": "cpu"},
    }

    parts = set(args.parts.split(",")) - set(args.skip.split(","))
    if "a" in parts:
        ours, theirs, rows = [], [], []
        for name, model in models:
            r_ours = run_attack(model, x, y, "cw", batch_size=len(x), **reduced)
            r_fb = run_attack(model, x, y, "foolbox-cw", batch_size=len(x), **reduced)
            ours.append(r_ours)
            theirs.append(r_fb)
            rows.append({"checkpoint": name, **median_ratio(r_ours.distances, r_fb.distances),
                         "time_ratio": round(r_ours.seconds / r_fb.seconds, 3)})
        summary = median_ratio(torch.cat([r.distances for r in ours]), torch.cat([r.distances for r in theirs]))
        out["a_cw_vs_foolbox_cw"] = {
            "hyperparameters": {**reduced, "initial_const": 1e-3, "lr": 0.01, "abort_early": True},
            **summary,
            "time_ratio": round(cost(ours)["seconds"] / cost(theirs)["seconds"], 3),
            "ours": cost(ours), "foolbox": cost(theirs), "per_checkpoint": rows,
            "targets": {"median_distance_ratio": [0.99, 1.01], "time_ratio_max": 0.5},
        }
        print(json.dumps(out["a_cw_vs_foolbox_cw"]), file=sys.stderr)

    if "b" in parts:
        k = min(args.reference_n, len(x))
        ens_results: list[AttackResult] = []
        ens_best, ref_results, rows = [], [], []
        for name, model in models:
            per_attack = [run_attack(model, x, y, a, batch_size=len(x), **fast_options(a)) for a in ENSEMBLE]
            ens_results += per_attack
            best = torch.stack([r.distances for r in per_attack]).amin(0)
            ens_best.append(best[:k])
            t0 = time.perf_counter()
            r_ref = run_attack(model, x[:k], y[:k], "foolbox-cw", batch_size=k)
            ref_results.append(r_ref)
            rows.append({"checkpoint": name, **median_ratio(best[:k], r_ref.distances),
                         "foolbox_seconds": round(time.perf_counter() - t0, 2)})
        ens_cost, ref_cost = cost(ens_results), cost(ref_results)
        per_point = {
            "ensemble_seconds_per_point": ens_cost["seconds"] / max(ens_cost["attacked_points"] / len(ENSEMBLE), 1),
            "foolbox_seconds_per_point": ref_cost["seconds"] / max(ref_cost["attacked_points"], 1),
        }
        out["b_fast_ensemble_vs_foolbox_cw_reference"] = {
            "ensemble": {name: fast_options(name) for name in ENSEMBLE},
            "reference": {"attack": "foolbox-cw", "steps": 10000, "binary_search_steps": 9, "abort_early": True,
                          "subset": f"first {k} of the {len(x)} points of each checkpoint (foolbox's reference CW "
                                    "is too slow for all of them on this CPU); distances compared on that subset, "
                                    "time compared per attacked point"},
            **median_ratio(torch.cat(ens_best), torch.cat([r.distances for r in ref_results])),
            "time_ratio": round(per_point["ensemble_seconds_per_point"] / per_point["foolbox_seconds_per_point"], 4),
            **{key: round(v, 4) for key, v in per_point.items()},
            "ensemble_cost_all_points": ens_cost, "foolbox_cost_subset": ref_cost,
            "per_checkpoint": rows,
            "targets": {"median_distance_ratio_max": 1.01, "time_ratio_max": round(1 / 20, 4)},
        }
    if "c" in parts:
        if args.selftest:
            data = {args.split: (x, y)}
        else:
            from robustmargin.rundir import load_split

            if args.checkpoints == "all":
                models = [models[0], models[-1]]
            data = {split: load_split(args.run, split) for split in ("train", "test")}
        out["c_tail"] = tail_part(models, data, args.n, [float(f) for f in args.factors.split(",")],
                                  [int(r) for r in args.restarts.split(",") if r])
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "tail.json").write_text(json.dumps(out, indent=2))
            (args.out / "tail.md").write_text(tail_markdown(out["c_tail"]))
        print(tail_markdown(out["c_tail"]), file=sys.stderr)
    if "d" in parts:
        if args.bn_cnn:
            data = {split: (t[0][:args.n], t[1][:args.n]) for split, t in bn_data.items()}
        elif args.selftest:
            data = {args.split: (x, y)}
        else:
            from robustmargin.rundir import load_split

            if args.checkpoints == "all":
                models = [models[0], models[-1]]
            data = {split: load_split(args.run, split) for split in ("train", "test")}
        strong_n = args.n if args.strong_n is None else args.strong_n
        out["d_budgets"] = budgets_part(models, data, args.n, strong_n)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "budgets.json").write_text(json.dumps(out, indent=2))
            (args.out / "budgets.md").write_text(budgets_markdown(out["d_budgets"]))
        print(budgets_markdown(out["d_budgets"]), file=sys.stderr)
    print(json.dumps(out, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
