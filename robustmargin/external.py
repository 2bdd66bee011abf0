"""Any PyTorch classifier as a run directory: `robustmargin attack --model SPEC` and `robustmargin.evaluate`.

The run's config.toml has an [external] table (robustmargin.rundir.ModelRecord: the model SPEC, the SHA-256
of its weights and of its data) and no [model] or [train]; the weights are copied to checkpoints/model.pt,
listed in the index as checkpoint `model`. From then on it is a run like any other: `attack`, `analyze`,
`report` and `compare` take it, and report what applies to the network (robustmargin.usermodel).
"""
from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from robustmargin.config import DATASETS, DataConfig
from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write
from robustmargin.rundir import (LIVE_DATA, USER_CHECKPOINT, ModelRecord, Run, claim_model_run, file_sha256,
                                 npz_bytes, portable_path, portable_spec, write_index)
from robustmargin.usermodel import build_module, check_data, check_outputs, load_weights, state_sha256


def _record_model(run_dir: Path, model: nn.Module) -> None:
    file = run_dir / "checkpoints" / f"{USER_CHECKPOINT}.pt"
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    try:
        old = torch.load(file, map_location="cpu", weights_only=True)["state_dict"]
        same = old.keys() == state.keys() and all(torch.equal(old[k], v) for k, v in state.items())
    except Exception:  # missing or damaged: write it
        same = False
    if not same:  # the same weights keep their file, and so their identity
        atomic_write(file, lambda tmp: torch.save({"state_dict": state}, tmp))
    write_index(run_dir, pd.DataFrame([{"name": USER_CHECKPOINT, "epoch": 0, "log10_loss": math.nan,
                                        "threshold_log10": math.nan, "file": file.name,
                                        "sha256": file_sha256(file)}]))


def _warn(message: str) -> None:
    print(f"robustmargin: warning: {message}", file=sys.stderr)


def attack_spec(spec: str, *, data: str, out: str | Path, weights: str | Path | None = None,
                split: str | None = None, n: int | None = None, data_root: str = "data", download: bool = False,
                sample: int | None = None, seed: int = 0, **options) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`robustmargin attack --model SPEC`: build the run directory `out`, then attack as for any run.

    With `sample`, a random subset of that many points of the split (drawn with `seed`) is attacked instead
    of the first `n`; it is kept in the run as data.npz, its test split. Every argument is checked before
    `out` is created, so a refused command leaves nothing behind.
    `options` go to robustness.evaluate_run (attacks, budget, steps, batch_size, device, progress)."""
    from robustmargin.data import load_data, load_npz
    from robustmargin.device import check_device
    from robustmargin.robustness import attack_settings, evaluate_run

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    settings_options = {k: options[k] for k in ("attacks", "budget", "steps", "batch_size") if k in options}
    check_device(options.get("device", "cpu"))
    attack_settings(points=1 if n is None else n, **settings_options)
    model = build_module(spec)
    warnings = []
    if weights is not None:
        load_weights(model, weights)
    else:
        warnings.append("no --weights given: the model is attacked with the weights its factory made")
    model.eval()
    if data in DATASETS:
        data_config = DataConfig(name=data, root=data_root, download=download)  # the root as written
        splits_data = load_data(data_config)
        stored_data, data_sha = data, ""
    elif data.endswith(".npz"):
        data_config = None
        splits_data = {"test": load_npz(data)}
        stored_data, data_sha = portable_path(data, out), file_sha256(data)
    else:
        raise UserError(f"--data must be one of {', '.join(DATASETS)} or an .npz file, got {data!r}")
    splits = tuple(splits_data) if split in (None, "both") else (split,)
    for s in splits:
        if s not in splits_data:
            raise UserError(f"the data {data} has no {s} split (an .npz file is the test split)")
        check_data(*splits_data[s], what=f"{data} {s}")
        warnings += [w for w in check_outputs(model, *splits_data[s]) if w not in warnings]
    subset = None
    if sample is not None:
        if len(splits) != 1:
            raise UserError("--sample draws from one split: give --split train or --split test")
        x, y = splits_data[splits[0]]
        if not 1 <= sample <= len(y):
            raise UserError(f"--sample must lie in [1, {len(y)}] (the {splits[0]} split), got {sample}")
        pick = torch.as_tensor(np.random.default_rng(seed).choice(len(y), size=sample, replace=False))
        subset = npz_bytes(x=x[pick].numpy(), y=y[pick].numpy(), index=pick.numpy())
        splits_data, splits, n = {"test": (x[pick], y[pick])}, ("test",), n or sample
        data_config, stored_data, data_sha = None, LIVE_DATA, hashlib.sha256(subset).hexdigest()
    if n is None:
        n = min(100, *(len(splits_data[s][1]) for s in splits))
    for s in splits:
        if n > len(splits_data[s][1]):
            raise UserError(f"--n {n} is larger than the {s} split ({len(splits_data[s][1])} points)")
    sha = file_sha256(weights) if weights is not None else state_sha256(model)
    for line in warnings:  # once every check has passed: an error stays one line
        _warn(line)
    claim_model_run(out, ModelRecord(model=portable_spec(spec, out), weights_sha256=sha, data=stored_data,
                                     data_sha256=data_sha, data_config=data_config))
    if subset is not None:  # the drawn points, with their indices in the split they came from
        atomic_write(out / LIVE_DATA, lambda tmp: Path(tmp).write_bytes(subset))
    _record_model(out, model)
    return evaluate_run(out, splits=splits, n=n, **options)


def _tensors(x, y=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from tensors, numpy arrays, a torch Dataset (torchvision's included) or a DataLoader."""
    if y is None:
        from torch.utils.data import DataLoader, Dataset

        if not isinstance(x, (DataLoader, Dataset)):
            raise UserError("give x and y, or a torch Dataset or DataLoader of (image, label) pairs")
        batches = x if isinstance(x, DataLoader) else DataLoader(x, batch_size=256)
        xs, ys = zip(*[(torch.as_tensor(a), torch.as_tensor(b)) for a, b in batches])
        return torch.cat(xs), torch.cat(ys)
    return (torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x,
            torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y)


def evaluate(model: nn.Module, x, y=None, *, out: str | Path, attacks: Sequence[str] | str = "ensemble",
             budget: str = "fast", steps: int | None = None, batch_size: int = 100, device: str = "cpu",
             analyze: bool = True, report: bool = True, progress: bool = False) -> pd.DataFrame:
    """Minimal L2 distances of a live module on (x, y) — tensors, numpy arrays, or a Dataset / DataLoader
    given as `x` — as the test split of a new run directory `out`, followed (by default) by the analysis and
    the report, as `robustmargin attack --model` + `analyze` + `report` would do.

    Returns one row per point (robustness/points.csv): index, label, correct, distance (the per-sample
    minimum over the attacks), best_attack and spread; `robust_accuracy_curve(result["distance"], eps)`
    takes it directly."""
    from robustmargin.device import check_device
    from robustmargin.robustness import attack_settings

    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x, y = _tensors(x, y)
    check_data(x, y)
    x, y = x.detach().float().cpu(), y.detach().long().cpu()
    check_device(device)
    attack_settings(points=len(x), attacks=attacks, budget=budget, steps=steps, batch_size=batch_size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out {out} is a file, not a directory")
    modes = {m: m.training for m in model.modules()}  # evaluated in eval mode, handed back as it came
    model.eval()
    try:
        return _evaluate(model, x, y, out, attacks=attacks, budget=budget, steps=steps, batch_size=batch_size,
                         device=device, analyze=analyze, report=report, progress=progress)
    finally:
        for m, training in modes.items():
            m.training = training


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: Path, *, attacks, budget, steps, batch_size,
              device, analyze, report, progress) -> pd.DataFrame:
    from robustmargin.robustness import evaluate_run

    for line in check_outputs(model, x, y):
        _warn(line)
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / LIVE_DATA
    if not (data_file.is_file() and _same_data(data_file, x, y)):  # a rerun keeps the file and its SHA-256
        atomic_write(data_file, lambda tmp: np.savez(open(tmp, "wb"), x=x.numpy(), y=y.numpy()))
    claim_model_run(out, ModelRecord(model=f"<live {type(model).__qualname__}>",
                                     weights_sha256=state_sha256(model), data=LIVE_DATA,
                                     data_sha256=file_sha256(data_file)))
    _record_model(out, model)
    with Run(out).attached(model) as run:
        evaluate_run(run, splits=("test",), n=len(x), attacks=attacks, budget=budget, steps=steps,
                     batch_size=batch_size, device=device, progress=progress)
        if analyze or report:
            from robustmargin.analysis import analyze_run
            analyze_run(run, device=device, progress=progress)
        points = run.results().points
    if report:
        from robustmargin.report import write_report
        write_report(out)
    return points.drop(columns=["checkpoint", "split"]).reset_index(drop=True)


def _same_data(path: Path, x: torch.Tensor, y: torch.Tensor) -> bool:
    from robustmargin.data import load_npz

    try:
        x0, y0 = load_npz(path)
    except UserError:
        return False
    return x0.shape == x.shape and y0.shape == y.shape and torch.equal(x0, x) and torch.equal(y0, y)


__all__ = ["attack_spec", "evaluate"]
