"""`robustmargin status --run DIR`: what each stage of a run (or of every run of a sweep) has done: done,
stale (its inputs changed since), partial (killed or unfinished) or missing."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("status", help="done / stale / partial / missing for each stage of a run or sweep",
                              description=__doc__)
    p.add_argument("--run", dest="run_dir", type=Path, required=True, metavar="DIR",
                   help="a run directory, or a sweep directory (DIR/runs/*/)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    import json

    from robustmargin.status import directory_status, format_status

    status = directory_status(args.run_dir)
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0
