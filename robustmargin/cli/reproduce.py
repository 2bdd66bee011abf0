"""`robustmargin reproduce`: train, attack, analyze and report one run in one command, with companion runs
of the other learning-rate schedules for the loss comparison and the quick theorem checks. Every stage
resumes, so after an interruption the same command finishes the job."""
from __future__ import annotations

import argparse
from pathlib import Path

from robustmargin.cli.common import SCHEDULES, preset_names
from robustmargin.cli.train import resolve
from robustmargin.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("reproduce", help="train → attack → analyze → report", description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"built-in configuration: {', '.join(preset_names())}")
    source.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--out", type=Path, help="run directory (default runs/PRESET or runs/CONFIG-NAME)")
    p.add_argument("--device", help="cpu or cuda, for training, attack and analysis (default: the config's train.device)")
    p.add_argument("--n", type=int, default=500, help="points attacked per split (default 500)")
    p.add_argument("--every-checkpoint", action="store_true",
                   help="attack every checkpoint (default: the first and the last, which the claims compare)")
    p.add_argument("--companions", default=None,
                   help="comma-separated schedules trained alongside for the loss comparison "
                        "(default: the schedules other than the config's; 'none' for none)")
    p.add_argument("--companion-seconds", type=float, default=45.0,
                   help="training time of each companion run (default 45)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, stage messages or summary")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from robustmargin.reproduce import reproduce

    args.resume, args.epochs, args.seed = True, None, None
    cfg, out = resolve(args)
    companions = None
    if args.companions is not None:
        companions = tuple(s for s in args.companions.split(",") if s and s != "none")
        unknown = [s for s in companions if s not in SCHEDULES]
        if unknown:
            raise UserError(f"unknown schedule {unknown[0]!r} in --companions; choose from {', '.join(SCHEDULES)}")
    seconds = reproduce(cfg, out, companions=companions, companion_seconds=args.companion_seconds,
                        n=args.n, every_checkpoint=args.every_checkpoint, device=cfg.train.device, quiet=args.quiet)
    if not args.quiet:
        print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return 0
