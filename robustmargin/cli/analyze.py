"""`robustmargin analyze --run DIR`: tables relating normalized margins, Lipschitz bounds, certified radii,
KKT residuals and attack distances, written to RUN/tables (and the certified radii to RUN/robustness)."""
from __future__ import annotations

import argparse
import sys

from robustmargin.cli.common import add_eps, check_device


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("analyze", help="write RUN/tables (margins, Lipschitz, certified radii, KKT)",
                              description=__doc__)
    p.add_argument("--run", dest="run_dir", required=True, metavar="DIR",
                   help="run directory: one written by `robustmargin train`, or by `robustmargin attack --model`")
    p.add_argument("--device", default="cpu", help="torch device for the forward passes: cpu (default) or cuda")
    p.add_argument("--kkt-k", type=int, default=100, metavar="K",
                   help="samples of smallest margin used for the KKT residuals (default: 100)")
    add_eps(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary (notes still go to stderr)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    from robustmargin.analysis import analyze_run

    result = analyze_run(args.run_dir, device=args.device, kkt_k=args.kkt_k, progress=not args.quiet,
                         epsilons=args.eps)
    for note in result.warnings:
        print(f"robustmargin analyze: note: {note}", file=sys.stderr)
    if not args.quiet:
        print(f"wrote {len(result.tables)} tables to {args.run_dir}/tables and certified radii to "
              f"{args.run_dir}/robustness/certified.csv")
    return 0
