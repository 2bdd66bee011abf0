"""`robustmargin train`: train a homogeneous network into a run directory (metrics.csv, checkpoints/), with a
checkpoint each time the training loss first falls below one of the configured thresholds and one at the
end. An interrupted run continues from its last accepted epoch with --resume."""
from __future__ import annotations

import argparse
from pathlib import Path

from robustmargin.cli.common import check_device, check_out_dir, preset_names, seed
from robustmargin.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model; checkpoints at loss thresholds", description=__doc__)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", help=f"built-in configuration: {', '.join(preset_names())}")
    source.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--out", type=Path, help="run directory (default runs/PRESET or runs/CONFIG-NAME)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last accepted epoch (with --out alone: the run's "
                        "own config.toml)")
    p.add_argument("--device", help="cpu or cuda (default: the config's train.device)")
    p.add_argument("--epochs", type=int,
                   help="the most epochs, counted from the start of the run (default: the config's train.epochs)")
    p.add_argument("--seed", type=seed, help="seed of the initialization and the batch order, in [0, 2**63 - 2] "
                                             "(default: the config's train.seed)")
    p.add_argument("--data-root", help="folder of torchvision datasets (default: the config's data.root)")
    p.add_argument("--download", action="store_true", default=None,
                   help="download a missing torchvision dataset into --data-root")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(run=run)


def resolve(args: argparse.Namespace):
    """The configuration and run directory a train-like command asks for."""
    from robustmargin.config import load_config, load_preset, with_overrides

    if args.preset:
        cfg, out = load_preset(args.preset), args.out or Path("runs") / args.preset
    elif args.config:
        cfg, out = load_config(args.config), args.out or Path("runs") / args.config.stem
    elif args.resume and args.out:
        from robustmargin.data import run_config

        cfg, out = run_config(args.out), args.out
    else:
        raise UserError("give --preset NAME or --config FILE (or --resume with --out DIR)")
    overrides = {"train.device": args.device, "train.epochs": args.epochs, "train.seed": args.seed,
                 "data.root": getattr(args, "data_root", None), "data.download": getattr(args, "download", None)}
    cfg = with_overrides(cfg, overrides)
    check_out_dir(out)  # the default runs/NAME too
    check_device(cfg.train.device, "--device" if args.device else "train.device")
    return cfg, out


def run(args: argparse.Namespace) -> int:
    from robustmargin.train import train

    cfg, out = resolve(args)
    train(cfg, out, resume=args.resume, quiet=args.quiet)
    return 0
