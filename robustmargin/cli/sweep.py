"""`robustmargin sweep`: one run directory per point of a grid over config keys, each taken through the
stages asked for. Every grid point's config is checked before anything runs; finished runs and stages are
kept, so running the same command again does only what is missing."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="train, attack and analyze one run per grid point", description=__doc__)
    p.add_argument("--config", type=Path, required=True,
                   help="TOML: a config (or preset = NAME) plus a [grid] table of dotted keys → lists")
    p.add_argument("--out", type=Path, required=True, help="sweep directory; runs go to OUT/runs/KEY=VALUE,…")
    p.add_argument("--stages", default="train,attack,analyze",
                   help="comma-separated stages of each run: train, attack, analyze, report "
                        "(default train,attack,analyze)")
    p.add_argument("--n", type=int, default=100, help="points attacked per split (default 100)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from robustmargin.sweep import sweep

    sweep(args.config, args.out, stages=args.stages, n=args.n, quiet=args.quiet)
    return 0
