"""Training benchmark; prints one JSON object.

(a) pass: seconds per SGD pass of robustmargin's loop (log-space relative loss, loss-based schedule) against a
    plain float32 PyTorch loop (F.cross_entropy + torch.optim.SGD) on the same model and data, interleaved.
(b) schedules: on the quick preset, the normalized schedule until the loss is below 1e-120, then the paper's
    loss-based schedule with `--budget` times as many gradient evaluations; for each: gradient evaluations
    (rolled-back passes included), seconds and normalized margin at the first epoch below each threshold,
    and the paper schedule's normalized margin at the normalized schedule's gradient-evaluation counts.

    python scripts/bench_train.py [--passes 20] [--budget 3] [--seed 0] [--out runs/bench-train] [--skip-schedules]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from robustmargin.config import load_preset, with_overrides
from robustmargin.train import Trainer, train

THRESHOLDS = (-10.0, -15.0, -20.0, -50.0, -120.0)


def time_passes(passes: int, out: Path) -> dict:
    cfg = with_overrides(load_preset("quick"), {"train.schedule": "loss-based"})
    ours = Trainer(cfg, out, quiet=True)
    ours.log_frame = ours.evaluate_train().log_mean
    torch.manual_seed(0)
    plain = Trainer(cfg, out, quiet=True).model  # same architecture, same data on the same device
    opt = torch.optim.SGD(plain.parameters(), lr=cfg.train.lr)
    x, y, b = ours.x, ours.y, cfg.train.batch_size
    gen = torch.Generator().manual_seed(0)

    def plain_pass() -> None:
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(order), b):
            idx = order[start:start + b]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(plain(x[idx]), y[idx]).backward()
            opt.step()

    times: dict[str, list[float]] = {"robustmargin": [], "plain": []}
    for i in range(passes + 2):  # interleaved so that machine noise hits both alike; 2 warm-up rounds
        for name, fn in (("robustmargin", ours.sgd_pass), ("plain", plain_pass)):
            start = time.perf_counter()
            fn()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    ours_s, plain_s = statistics.median(times["robustmargin"]), statistics.median(times["plain"])
    return {"model": "quick preset CNN", "points": len(y), "batch_size": b, "passes": passes,
            "seconds_per_pass": {"robustmargin": ours_s, "plain_pytorch": plain_s},
            "ratio": ours_s / plain_s, "target_ratio_max": 1.15}


def crossings(metrics: pd.DataFrame) -> dict:
    rows = {}
    for thr in THRESHOLDS:
        below = metrics[metrics["log10_loss"] < thr]
        if len(below):
            r = below.iloc[0]
            rows[f"1e{thr:g}"] = {"epoch": int(r["epoch"]), "grad_evals": int(r["grad_evals"]),
                                 "seconds": float(r["seconds"]), "normalized_margin": float(r["normalized_margin"])}
        else:
            rows[f"1e{thr:g}"] = None
    return rows


def margin_at(metrics: pd.DataFrame, grad_evals: int) -> float:
    before = metrics[metrics["grad_evals"] <= grad_evals]
    return float(before["normalized_margin"].iloc[-1])


def run_schedules(out: Path, budget: float, seed: int) -> dict:
    base = with_overrides(load_preset("quick"), {"train.seed": seed})
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, max_seconds=math.inf,
                                                                stop_log10_loss=-120.0))
    result = {}
    fast_cfg = with_overrides(base, {"train.schedule": "normalized"})
    shutil.rmtree(out / "normalized", ignore_errors=True)
    train(fast_cfg, out / "normalized")
    fast = pd.read_csv(out / "normalized" / "metrics.csv")
    result["normalized"] = crossings(fast)
    fast_evals = int(fast["grad_evals"].iloc[-1])
    paper_cfg = with_overrides(base, {"train.schedule": "loss-based", "train.max_steps": int(budget * fast_evals)})
    shutil.rmtree(out / "loss-based", ignore_errors=True)
    train(paper_cfg, out / "loss-based")
    paper = pd.read_csv(out / "loss-based" / "metrics.csv")
    result["loss-based"] = crossings(paper)
    reached = result["loss-based"]["1e-120"]
    result["grad_evals_to_1e-120"] = {
        "normalized": fast_evals,
        "loss-based": reached["grad_evals"] if reached else f"> {int(paper['grad_evals'].iloc[-1])} (not reached)",
        "ratio_at_most": fast_evals / (reached["grad_evals"] if reached else int(paper["grad_evals"].iloc[-1])),
        "target_ratio_max": 1 / 3,
    }
    result["normalized_margin_at_equal_grad_evals"] = [
        {"grad_evals": row["grad_evals"], "normalized": row["normalized_margin"],
         "loss-based": margin_at(paper, row["grad_evals"])}
        for row in result["normalized"].values() if row and row["grad_evals"] <= paper["grad_evals"].iloc[-1]]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--budget", type=float, default=3.0,
                        help="paper schedule's gradient-evaluation budget, in multiples of the normalized one's")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-train"))
    parser.add_argument("--seed", type=int, default=0, help="training seed of both schedule runs")
    parser.add_argument("--skip-schedules", action="store_true")
    args = parser.parse_args()
    report = {"threads": torch.get_num_threads(), "pass": time_passes(args.passes, args.out / "pass")}
    if not args.skip_schedules:
        report["schedules"] = run_schedules(args.out, args.budget, args.seed)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
