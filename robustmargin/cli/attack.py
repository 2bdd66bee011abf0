"""`robustmargin attack`: per-sample minimal L2 adversarial distances and robust-accuracy curves for the
checkpoints of a run (--run DIR), or for any PyTorch classifier (--model SPEC), which becomes a new run
directory (--out). Finished batches are kept, so an interrupted attack continues where it stopped when the
same command is run again."""
from __future__ import annotations

import argparse
from pathlib import Path

from robustmargin.cli.common import ATTACKS, BUDGETS, ENSEMBLES, add_eps, check_device, seed
from robustmargin.errors import UserError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("attack", help="minimal L2 adversarial distances and robust-accuracy curves",
                              description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", dest="run_dir", type=Path, metavar="DIR",
                        help="run directory written by `robustmargin train`")
    source.add_argument("--model", metavar="SPEC",
                        help="path/to/file.py:factory or package.module:factory, a callable returning an "
                             "nn.Module that maps images in [0,1] to logits")
    p.add_argument("--weights", type=Path, metavar="FILE",
                   help="with --model: a state dict or robustmargin checkpoint (loaded with weights_only=True)")
    p.add_argument("--data", metavar="NAME", help="with --model: mnist5k, mnist, cifar10, or an .npz file with "
                                                  "x (N, C, H, W in [0,1]) and y")
    p.add_argument("--data-root", default="data", help="with --model: where torchvision datasets live (default data)")
    p.add_argument("--download", action="store_true", help="with --model: fetch a torchvision dataset if missing")
    p.add_argument("--out", type=Path, metavar="DIR", help="with --model: the run directory to create")
    p.add_argument("--split", choices=("train", "test", "both"),
                   help="default: both (--model: both for a named dataset, test for an .npz file)")
    p.add_argument("--n", type=int, help="points per split, the same for every checkpoint (default 100; with "
                                         "--model, the smallest split's size if that is fewer)")
    p.add_argument("--attacks", default="ensemble",
                   help=f"comma list of {', '.join(ATTACKS)}, or 'ensemble' (the default): the budget's "
                        f"ensemble, {'; '.join(f'{b}: ' + ','.join(e) for b, e in ENSEMBLES.items())}")
    p.add_argument("--checkpoints", default="all", help="all (default) or a comma list of checkpoint names")
    p.add_argument("--budget", choices=BUDGETS, default="fast",
                   help="fast (default): short tuned budgets; reference: each attack's reference settings "
                        "(CW 9x10000 steps); strong: reference CW, DDN and FMN with 10 restarts each")
    p.add_argument("--steps", type=int, help="override the step count of every attack")
    p.add_argument("--batch-size", type=int, default=100, help="points per attack batch (default 100)")
    p.add_argument("--sample", type=int, metavar="N",
                   help="with --model: attack a random subset of N points of the split (drawn with --seed, kept "
                        "in the run as data.npz) instead of the first --n")
    p.add_argument("--seed", type=seed, default=0, help="with --sample: the seed of the subset (default 0)")
    add_eps(p)
    p.add_argument("--masking-check", choices=("auto", "on", "off"), default="auto",
                   help="compare the gradient attacks with the decision-based foolbox-hsj on 10 points, to "
                        "catch gradient masking (auto, the default: on for --model, off for --run)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    options = dict(attacks=args.attacks, budget=args.budget, steps=args.steps, batch_size=args.batch_size,
                   device=args.device, progress=not args.quiet,
                   masking={"auto": None, "on": True, "off": False}[args.masking_check])
    if args.model is not None:
        if args.data is None or args.out is None:
            raise UserError("--model needs --data and --out")
        if args.checkpoints != "all":
            raise UserError("--checkpoints applies to --run only (an external model is checkpoint `model`)")
        check_device(args.device)
        from robustmargin.external import attack_spec

        distances, _ = attack_spec(args.model, weights=args.weights, data=args.data, out=args.out,
                                   split=args.split, n=args.n, data_root=args.data_root, download=args.download,
                                   sample=args.sample, seed=args.seed, **options)
        args.run_dir = args.out
    else:
        given = [f for f, v in (("--weights", args.weights), ("--data", args.data), ("--out", args.out),
                                ("--sample", args.sample)) if v]
        if given:
            raise UserError(f"{', '.join(given)} go with --model, not --run")
        split = args.split or "both"
        splits = ("train", "test") if split == "both" else (split,)
        if not args.run_dir.is_dir():
            raise UserError(f"run directory {args.run_dir} does not exist")
        check_device(args.device)
        from robustmargin.robustness import evaluate_run

        distances, _ = evaluate_run(args.run_dir, splits=splits, n=100 if args.n is None else args.n,
                                    checkpoints=args.checkpoints, **options)
    from robustmargin import distributed

    if args.eps is not None and distributed.world().is_main:
        from robustmargin.rundir import Run

        Run(args.run_dir).choose_epsilons(args.eps)  # analyze and report use them from now on
    if not args.quiet and distributed.world().is_main:  # under torchrun, one summary
        best = distances.groupby(["checkpoint", "split", "index"], sort=False)["distance"].min().reset_index()
        summary = best.groupby(["checkpoint", "split"], sort=False)["distance"].agg(
            clean_acc=lambda d: float((d > 0).mean()), median_distance="median")
        print(summary.to_string(float_format=lambda v: f"{v:.4g}"))
        print(f"wrote {args.run_dir / 'robustness' / 'distances.csv'} and curves.csv")
    return 0
