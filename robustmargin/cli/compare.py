"""`robustmargin compare`: does a larger normalized margin go with larger attack distances? One row per run
and checkpoint from each run's own tables and attack results, Spearman correlations at each loss threshold
with bootstrap intervals, figures and a compare.html, for the runs of a sweep (DIR/compare/) or for any
analyzed runs (--runs ... --out DIR)."""
from __future__ import annotations

import argparse
from pathlib import Path

from robustmargin.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("compare", help="compare margins and robustness across runs", description=__doc__)
    p.add_argument("dir", type=Path, nargs="?", help="sweep directory (writes DIR/compare/)")
    p.add_argument("--runs", type=Path, nargs="+", help="run directories to compare instead of a sweep")
    p.add_argument("--out", type=Path, help="output directory (with --runs)")
    p.add_argument("--split", default="test", choices=("train", "test"),
                   help="split whose attack results are compared (default test)")
    p.add_argument("--eps", "--epsilons", dest="epsilons", help="comma-separated ε of the robust-accuracy columns "
                                      "(default 5 evenly spaced up to the largest distance)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from robustmargin.compare import compare_runs, compare_sweep

    epsilons = None
    if args.epsilons is not None:
        try:
            epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
        except ValueError:
            raise UserError(f"--epsilons must be comma-separated numbers, got {args.epsilons!r}") from None
        if not epsilons or any(not e >= 0 for e in epsilons):
            raise UserError(f"--epsilons must be non-negative numbers, got {args.epsilons!r}")
    if (args.dir is None) == (args.runs is None):
        raise UserError("give a sweep directory, or --runs A B … with --out DIR")
    if args.runs is not None:
        if args.out is None:
            raise UserError("--runs needs --out DIR for the comparison")
        written = compare_runs(args.runs, args.out, split=args.split, epsilons=epsilons)
    else:
        if args.out is not None:
            raise UserError("--out goes with --runs; a sweep's comparison is written to DIR/compare")
        written = compare_sweep(args.dir, split=args.split, epsilons=epsilons)
    print(written["compare.html"])
    return 0
