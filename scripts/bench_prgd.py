"""Progressive rescaling (the idea of PRGD, Wang et al. 2023, arXiv 2311.14387) as a schedule for the quick
preset's homogeneous CNN, against `normalized` and `loss-based`, at equal gradient evaluations; prints JSON.

The rescaling schedule is the `normalized` one plus: at the start of every pass, once the mean training loss
of the last accepted epoch is below 10^threshold (every point classified), θ ← c θ with c^L = `factor`, which
multiplies every logit by `factor` and leaves the normalized margin unchanged. It is injected into the
Trainer here; it is not one of robustmargin's schedules.

    python scripts/bench_prgd.py [--steps 3000] [--factor 1.1] [--threshold -3] [--seed 0] [--out runs/bench-prgd]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import torch

from robustmargin.config import load_preset, with_overrides
from robustmargin.schedules import Normalized
from robustmargin.train import Trainer


class ProgressiveRescaling(Normalized):
    def __init__(self, cfg, *, factor: float, threshold: float, steps_per_pass: int):
        super().__init__(cfg)
        self.factor, self.threshold, self.steps_per_pass, self.count = factor, threshold, steps_per_pass, 0

    def step(self, model, params, x, y, log_frame: float) -> bool:
        if self.count % self.steps_per_pass == 0 and log_frame / math.log(10) < self.threshold:
            with torch.no_grad():
                torch._foreach_mul_(params, self.factor ** (1 / model.order))
        self.count += 1
        return super().step(model, params, x, y, log_frame)


def run(cfg, out: Path, schedule=None) -> pd.DataFrame:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    trainer = Trainer(cfg, out, quiet=True)
    if schedule is not None:
        trainer.schedule = schedule
    trainer.run(resume=False)
    return pd.read_csv(out / "metrics.csv")


def margin_at(metrics: pd.DataFrame, grad_evals: int) -> float:
    return float(metrics.loc[metrics["grad_evals"] <= grad_evals, "normalized_margin"].iloc[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="gradient evaluations per schedule")
    parser.add_argument("--factor", type=float, default=1.1, help="logit factor of each rescaling")
    parser.add_argument("--threshold", type=float, default=-3.0, help="log10 mean loss below which to rescale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-prgd"))
    args = parser.parse_args()
    base = with_overrides(load_preset("quick"), {"train.seed": args.seed, "train.max_steps": args.steps,
                                                  "train.stop_log10_loss": -1e9})
    runs = {}
    for name in ("normalized", "loss-based"):
        runs[name] = run(with_overrides(base, {"train.schedule": name}), args.out / name)
    cfg = with_overrides(base, {"train.schedule": "normalized"})
    steps_per_pass = math.ceil(cfg.data.n_train / cfg.train.batch_size)
    runs["rescaling"] = run(cfg, args.out / "rescaling",
                            ProgressiveRescaling(cfg.train, factor=args.factor, threshold=args.threshold,
                                                 steps_per_pass=steps_per_pass))
    marks = [args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps]
    report = {"steps": args.steps, "factor": args.factor, "threshold": args.threshold, "seed": args.seed,
              "normalized_margin_at_grad_evals": [{"grad_evals": m, **{k: margin_at(v, m) for k, v in runs.items()}}
                                                  for m in marks],
              "final_log10_loss": {k: float(v["log10_loss"].iloc[-1]) for k, v in runs.items()},
              "seconds": {k: float(v["seconds"].iloc[-1]) for k, v in runs.items()}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
