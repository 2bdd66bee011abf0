"""`robustmargin attack`: per-sample minimal L2 distances and robust-accuracy curves for a run."""
from __future__ import annotations

import argparse
from pathlib import Path

from robustmargin.attacks.runner import ATTACKS, BUDGETS, ENSEMBLE
from robustmargin.errors import UserError
from robustmargin.robustness import evaluate_run


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("attack", help="minimal L2 adversarial distances and robust-accuracy curves",
                              description=__doc__)
    p.add_argument("--run", dest="run_dir", type=Path, required=True, metavar="DIR",
                   help="run directory written by `robustmargin train`")
    p.add_argument("--split", choices=("train", "test", "both"), default="both", help="default: both")
    p.add_argument("--n", type=int, default=100, help="points per split, the same for every checkpoint (default 100)")
    p.add_argument("--attacks", default=",".join(ENSEMBLE),
                   help=f"comma list of {', '.join(ATTACKS)} or 'ensemble' (default {','.join(ENSEMBLE)})")
    p.add_argument("--checkpoints", default="all", help="all (default) or a comma list of checkpoint names")
    p.add_argument("--budget", choices=tuple(BUDGETS), default="fast",
                   help="fast (default): short tuned budgets; reference: each attack's reference settings "
                        "(CW 9x10000 steps); strong: reference CW, DDN and FMN with 10 restarts each")
    p.add_argument("--steps", type=int, help="override the step count of every attack")
    p.add_argument("--batch-size", type=int, default=100, help="points per attack batch (default 100)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    splits = ("train", "test") if args.split == "both" else (args.split,)
    if not args.run_dir.is_dir():
        raise UserError(f"run directory {args.run_dir} does not exist")
    distances, _ = evaluate_run(
        args.run_dir, splits=splits, n=args.n, attacks=args.attacks, checkpoints=args.checkpoints,
        budget=args.budget, steps=args.steps, batch_size=args.batch_size, device=args.device,
        progress=not args.quiet,
    )
    if not args.quiet:
        best = distances.groupby(["checkpoint", "split", "index"], sort=False)["distance"].min().reset_index()
        summary = best.groupby(["checkpoint", "split"], sort=False)["distance"].agg(
            clean_acc=lambda d: float((d > 0).mean()), median_distance="median")
        print(summary.to_string(float_format=lambda v: f"{v:.4g}"))
        print(f"wrote {args.run_dir / 'robustness' / 'distances.csv'} and curves.csv")
    return 0
