"""`robustmargin report --run DIR`: figures (RUN/figures/*.png) and a self-contained RUN/report.html drawn
from the files of an analyzed run; no stage is rerun."""
from __future__ import annotations

import argparse

from robustmargin.cli.common import add_eps


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="write RUN/figures/*.png and RUN/report.html (after analyze)",
                              description=__doc__)
    p.add_argument("--run", dest="run_dir", required=True, metavar="DIR",
                   help="run directory, analyzed with `robustmargin analyze`")
    add_eps(p)
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from robustmargin.report import write_report

    path = write_report(args.run_dir, epsilons=args.eps)
    if not args.quiet:
        print(f"wrote {path}")
    return 0
