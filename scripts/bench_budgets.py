"""What each attack budget costs and buys on one checkpoint; prints one JSON object.

For every budget in robustmargin.attacks.BUDGETS, its ensemble (ENSEMBLES[budget]) runs on the
first `--n` points of a split: seconds, samples through forward and backward passes, and the
median per-sample minimum distance. Then the strong budget against the fast one, per point:
how much lower the strong per-sample minimum is (median and worst point).

Usage: python scripts/bench_budgets.py --run DIR [--checkpoint final] [--n 100] [--split test]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from robustmargin.attacks import BUDGETS, ENSEMBLES, budget_options, per_sample_minimum, run_attack
from robustmargin.device import configure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--checkpoint", default="final")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from robustmargin import load_checkpoint, load_split

    torch.set_num_threads(1)
    configure(args.device)  # IEEE float32 and deterministic kernels on CUDA, as every stage
    model, _ = load_checkpoint(args.run / "checkpoints" / f"{args.checkpoint}.pt")
    x, y = load_split(args.run, args.split)
    x, y = x[: args.n], y[: args.n]
    report: dict = {"run": str(args.run), "checkpoint": args.checkpoint, "split": args.split, "n": len(x),
                    "budgets": {}}
    best: dict[str, torch.Tensor] = {}
    for budget in BUDGETS:
        entry: dict = {"attacks": {}}
        runs = []
        for name in ENSEMBLES[budget]:
            options = budget_options(name, budget)
            result = run_attack(model, x, y, name, batch_size=len(x), device=args.device, **options)
            runs.append(result.distances)
            finite = result.distances[torch.isfinite(result.distances)]
            entry["attacks"][name] = {
                "options": options, "seconds": round(result.seconds, 2), "forwards": result.forwards,
                "backwards": result.backwards, "attacked": result.attacked,
                "failures": int((~torch.isfinite(result.distances)).sum()),
                "median_distance": float(finite.median()) if len(finite) else math.inf,
            }
        best[budget] = per_sample_minimum(runs)
        entry["seconds"] = round(sum(a["seconds"] for a in entry["attacks"].values()), 2)
        entry["forwards"] = sum(a["forwards"] for a in entry["attacks"].values())
        entry["backwards"] = sum(a["backwards"] for a in entry["attacks"].values())
        entry["median_distance"] = float(best[budget].median())
        report["budgets"][budget] = entry
    attacked = (best["fast"] > 0) & torch.isfinite(best["fast"]) & torch.isfinite(best["strong"])
    ratio = best["strong"][attacked] / best["fast"][attacked]
    report["strong_vs_fast"] = {
        "points": int(attacked.sum()),
        "median_ratio": float(ratio.median()),
        "worst_point_ratio": float(ratio.min()),
        "share_lower_by_1pct": float((ratio < 0.99).double().mean()),
        "cost_ratio_seconds": report["budgets"]["strong"]["seconds"] / report["budgets"]["fast"]["seconds"],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
