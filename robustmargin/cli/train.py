"""`robustmargin train`: train a homogeneous network into a run directory."""
from __future__ import annotations

import argparse
from pathlib import Path

from robustmargin.config import load_config, load_preset, preset_names, with_overrides
from robustmargin.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model; checkpoints at loss thresholds")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", help=f"built-in configuration: {', '.join(preset_names())}")
    source.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--out", type=Path, help="run directory (default runs/PRESET or runs/CONFIG-NAME)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last accepted epoch")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--data-root", help="folder of torchvision datasets")
    p.add_argument("--download", action="store_true", default=None, help="download torchvision datasets")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def resolve(args: argparse.Namespace):
    """The configuration and run directory a train-like command asks for."""
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
    return with_overrides(cfg, overrides), out


def run(args: argparse.Namespace) -> int:
    from robustmargin.train import train  # torch loads only when a command runs, not for --help

    cfg, out = resolve(args)
    train(cfg, out, resume=args.resume, quiet=args.quiet)
    return 0
