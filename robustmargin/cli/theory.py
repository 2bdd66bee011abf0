"""`robustmargin theory --out DIR [--quick]`: the paper's theorems (4.1-4.4) and the linear SVM limit,
checked under float64 gradient flow on small cases that meet their assumptions; writes DIR/theory.csv,
DIR/theory.html and DIR/linear.npz."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("theory", help="check Theorems 4.1-4.4 and the linear SVM limit; write DIR/theory.*",
                              description=__doc__)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for theory.csv, theory.html, linear.npz")
    p.add_argument("--quick", action="store_true", help="shorter flows (about a minute of CPU time)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from robustmargin.theory import run_theory

    table = run_theory(args.out, quick=args.quick, progress=not args.quiet)
    if not args.quiet:
        judged = table[table["passed"].notna()]
        print(f"{int(judged['passed'].astype(bool).sum())}/{len(judged)} targets met; wrote {args.out}/theory.csv "
              f"and {args.out}/theory.html")
    return 0
