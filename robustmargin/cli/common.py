"""What the command parsers share, light enough for --help: no torch, numpy or stage module is imported here.

The name lists below mirror registries that live in torch-importing modules; tests/test_cli_fast.py checks
that they are equal.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from robustmargin.errors import UserError

# robustmargin.attacks.runner: ATTACKS, BUDGETS and ENSEMBLES
ATTACKS = ("cw", "ddn", "fmn", "foolbox-cw", "foolbox-ddn", "foolbox-fmn", "foolbox-hsj", "alma", "apgd")
BUDGETS = ("fast", "reference", "strong")
ENSEMBLES = {"fast": ("ddn", "alma", "apgd"), "reference": ("ddn", "alma", "apgd"), "strong": ("cw", "ddn", "fmn")}
# robustmargin.config.SCHEDULES
SCHEDULES = ("constant", "loss-based", "normalized")

# a run's config.toml holds the seed (TOML integers are signed 64-bit) and its batch order is drawn from seed + 1
SEED_MAX = 2 ** 63 - 2


def preset_names() -> list[str]:
    """The built-in presets (robustmargin/presets/*.toml), listed without importing the config module (nor
    importlib.resources, which alone costs a tenth of a second)."""
    import robustmargin.presets

    folder = os.path.dirname(robustmargin.presets.__file__)
    return sorted(name[:-5] for name in os.listdir(folder) if name.endswith(".toml"))


def seed(text: str) -> int:
    """argparse type of --seed: an integer in [0, 2**63 - 2]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2**63 - 2], got {text}")
    return value


def epsilons(text: str) -> list[float]:
    """argparse type of --eps: a comma list of finite, non-negative numbers."""
    try:
        values = [float(e) for e in text.split(",") if e.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a comma list of numbers, got {text!r}") from None
    if not values or not all(0 <= v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"must be finite non-negative numbers, got {text!r}")
    return sorted(set(values))


def add_eps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eps", type=epsilons, metavar="E1,E2,…",
                   help="the L2 budgets ε at which robust accuracy is reported with 95 %% intervals (default: "
                        "those chosen by an earlier `attack --eps`, else the quartiles of the distances)")


def check_out_dir(path: Path | str | None, flag: str = "--out") -> None:
    """A directory to create or reuse: refused at once if it, or the nearest existing folder above it,
    is a file."""
    if path is None:
        return
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"lies under {p}, which is a file"
                raise UserError(f"{flag} {path} {what}, not a directory")
            return


def check_device(device: str | None, flag: str = "--device") -> None:
    """Refuse a CUDA device when torch sees none, before any work (other names are checked downstream)."""
    if device is None or not str(device).startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{flag} {device}: torch sees no CUDA device; use --device cpu")
