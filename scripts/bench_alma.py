"""ALMA at 100 steps: the former fast setting (α = 0.9, lr = 0.1) against the authors' 100-step setting
(α = 0.5, first step sized to 0.1), on the small CNN that bench_attacks.py --selftest trains (and its copy
with logits ×1e3). Per point: the distance over the best that either setting, ALMA at 1000 steps, DDN
and FMN at 1000 steps found. Prints one JSON object; a few minutes on one CPU thread.

Usage: python scripts/bench_alma.py [--n 100]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_attacks import selftest_models  # noqa: E402

from robustmargin.attacks import run_attack  # noqa: E402

SETTINGS = {"former": ("alma", {"steps": 100}),
            "authors": ("alma", {"steps": 100, "alpha": 0.5, "init_lr_distance": 0.1}),
            "alma-1000": ("alma", {"steps": 1000}), "ddn-1000": ("ddn", {"steps": 1000}),
            "fmn-1000": ("fmn", {"steps": 1000})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models, x, y = selftest_models(args.n)
    out = {}
    for name, model in models:
        found = {}
        for label, (attack, options) in SETTINGS.items():
            t0 = time.perf_counter()
            found[label] = (run_attack(model, x, y, attack, **options).distances.numpy(), time.perf_counter() - t0)
        best = np.minimum.reduce([d for d, _ in found.values()])
        attacked = best > 0
        for label in ("former", "authors"):
            d, seconds = found[label]
            ratio = d[attacked] / best[attacked]
            out[f"{name}/{label}"] = {
                "median": round(float(np.median(ratio)), 4), "p90": round(float(np.percentile(ratio, 90)), 4),
                "worst": round(float(ratio.max()), 4), "within_1pct": round(float((ratio <= 1.01).mean()), 3),
                "failures": int(np.isinf(ratio).sum()), "seconds": round(seconds, 2), "points": int(attacked.sum())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
