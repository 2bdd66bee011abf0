"""Per-sample distances → robust-accuracy curves, and the attack stage of a run directory.

acc(ε) = (1/N) Σ_n 1[d_n > ε], where d_n is the smallest distance any attack found for
point n: 0 if the clean prediction is wrong, inf if no attack succeeded (so the point
counts as robust at every ε — an attack failure is never turned into a success).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from robustmargin.attacks.runner import (
    BUDGETS,
    ENSEMBLE,
    budget_options,
    get_attack,
    per_sample_minimum,
    run_attack,
)
from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write_csv


DEFAULT_POINTS = 101
DISTANCE_COLUMNS = ["checkpoint", "split", "index", "label", "correct", "attack", "distance"]
CURVE_COLUMNS = ["checkpoint", "split", "epsilon", "robust_accuracy"]
COST_COLUMNS = ["checkpoint", "split", "attack", "points", "attacked", "seconds", "forwards", "backwards"]
SPLITS = ("train", "test")


def _distances(distances: Tensor | Sequence[float]) -> Tensor:
    if isinstance(distances, Tensor):
        d = distances.detach().to(device="cpu", dtype=torch.float64).flatten()
    else:  # a copy: pandas hands out read-only arrays
        d = torch.tensor(np.asarray(distances, dtype=np.float64)).flatten()
    if bool(torch.isnan(d).any()) or bool((d < 0).any()):
        raise UserError("distances must be non-negative (0 = misclassified, inf = attack failure), without NaN")
    return d


def robust_accuracy_curve(distances: Tensor | Sequence[float], epsilons: Tensor | Sequence[float]) -> Tensor:
    """acc(ε) = mean(d > ε) for each ε; float64 tensor shaped like `epsilons` (flattened)."""
    d = _distances(distances)
    eps = torch.as_tensor(epsilons, dtype=torch.float64).flatten().cpu()
    if d.numel() == 0:
        raise UserError("no distances to build a curve from")
    if bool(torch.isnan(eps).any()):
        raise UserError("epsilons must not be NaN")
    return (d[None, :] > eps[:, None]).to(torch.float64).mean(dim=1)


def _nice_ceil(value: float) -> float:
    """Round up to two significant digits, so grids have readable end points."""
    value = max(value, 1e-12)  # subnormal distances would underflow the scale below
    scale = 10.0 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(value / scale - 1e-9) * scale


def default_epsilons(distances: Tensor | Sequence[float], *, points: int = DEFAULT_POINTS) -> Tensor:
    """`points` evenly spaced ε from 0 to a little above the largest finite positive distance.

    Give it the distances of everything that will be plotted together (all checkpoints and
    splits), so that the curves share one grid.
    """
    d = _distances(distances)
    finite = d[torch.isfinite(d) & (d > 0)]
    top = _nice_ceil(1.05 * float(finite.max())) if finite.numel() else 1.0
    return torch.linspace(0.0, top, points, dtype=torch.float64)


def per_sample_best(frame: pd.DataFrame) -> pd.DataFrame:
    """distances.csv rows → one row per (checkpoint, split, index) with the minimum over attacks."""
    keys = ["checkpoint", "split", "index"]
    best = frame.groupby(keys, sort=False).agg(label=("label", "first"), correct=("correct", "first"),
                                               distance=("distance", "min"))
    return best.reset_index()


def curves_frame(frame: pd.DataFrame, epsilons: Tensor | Sequence[float] | None = None) -> pd.DataFrame:
    """distances.csv rows → curves.csv rows, from the per-sample minimum over attacks, on one shared grid."""
    best = per_sample_best(frame)
    grid = default_epsilons(best["distance"].to_numpy()) if epsilons is None else torch.as_tensor(epsilons)
    grid = grid.to(torch.float64)
    rows = []
    for (checkpoint, split), group in best.groupby(["checkpoint", "split"], sort=False):
        acc = robust_accuracy_curve(group["distance"].to_numpy(), grid)
        rows.append(pd.DataFrame({"checkpoint": checkpoint, "split": split,
                                  "epsilon": grid.numpy(), "robust_accuracy": acc.numpy()}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=CURVE_COLUMNS)


def ensemble_distances(distances_by_attack: Iterable[Tensor]) -> Tensor:
    """Per-sample minimum over attacks (the ensemble's distance)."""
    return per_sample_minimum(distances_by_attack)


# --------------------------------------------------------------------------- the attack stage


def resolve_attacks(names: Sequence[str] | str) -> list[str]:
    """Attack names from a list or a comma list; "ensemble" expands to the fast default set."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for name in names:
        for item in (ENSEMBLE if name == "ensemble" else (name,)):
            get_attack(item)  # unknown name → UserError
            if item not in out:
                out.append(item)
    if not out:
        raise UserError("no attack given")
    return out


def _options(name: str, budget: str, steps: int | None) -> dict[str, Any]:
    return budget_options(name, budget, steps=steps)


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _select_checkpoints(index: pd.DataFrame, checkpoints: Sequence[str] | str | None) -> pd.DataFrame:
    if checkpoints is None or checkpoints == "all":
        return index
    wanted = [c.strip() for c in checkpoints.split(",")] if isinstance(checkpoints, str) else list(checkpoints)
    names = list(index["name"])
    for name in wanted:
        if name not in names:
            raise UserError(f"unknown checkpoint {name!r}; this run has: {', '.join(map(str, names))}")
    return index[index["name"].isin(wanted)]


def _device(device: str) -> torch.device:
    if str(device).split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu or cuda, got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"bad device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device")
    return dev


def evaluate_run(
    run_dir: str | Path,
    *,
    splits: Sequence[str] = SPLITS,
    n: int = 100,
    attacks: Sequence[str] | str = ENSEMBLE,
    checkpoints: Sequence[str] | str | None = None,
    budget: str = "fast",
    steps: int | None = None,
    batch_size: int = 100,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Attack the first `n` points of each split with every attack on every checkpoint.

    The same points (the first n of the run's split, which data.py stores in a
    class-stratified order) are used for every checkpoint. Each finished batch is saved
    as a part file under robustness/parts/, so an interrupted evaluation resumes without
    redoing finished batches; at the end the parts are merged into robustness/
    distances.csv, curves.csv (per-sample minimum over attacks) and costs.csv.
    Returns (distances, curves) as DataFrames.
    """
    from tqdm.auto import tqdm

    from robustmargin.checkpoints import read_index
    from robustmargin.data import load_split

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    if budget not in BUDGETS:
        raise UserError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if n < 1 or batch_size < 1 or (steps is not None and steps < 1):
        raise UserError("--n, --batch-size and --steps must be at least 1")
    for split in splits:
        if split not in SPLITS:
            raise UserError(f"split must be train or test, got {split!r}")
    names = resolve_attacks(attacks)
    options = {name: _options(name, budget, steps) for name in names}
    dev = _device(device)
    chosen = _select_checkpoints(read_index(run_dir), checkpoints)
    if chosen.empty:
        raise UserError(f"{run_dir} has no checkpoints")

    data: dict[str, tuple[Tensor, Tensor]] = {}
    for split in splits:
        x, y = load_split(run_dir, split)
        if n > len(x):
            raise UserError(f"--n {n} is larger than the {split} split ({len(x)} points)")
        data[split] = (x[:n], y[:n])

    out_dir = run_dir / "robustness"
    parts_root = out_dir / "parts"
    part_frames: list[pd.DataFrame] = []
    for row in chosen.itertuples(index=False):
        ckpt = str(row.name)
        model = None
        for split, (x, y) in data.items():
            for name in names:
                # n is not in the key: batches cover fixed index ranges, so a larger --n reuses them
                key = _digest({"attack": name, "options": options[name], "batch_size": batch_size,
                               "file": str(row.file), "epoch": int(row.epoch), "log10_loss": float(row.log10_loss)})
                folder = parts_root / ckpt / split / f"{name}-{key}"
                with tqdm(total=n, desc=f"{ckpt} {split} {name}", disable=not progress, leave=False) as bar:
                    for start in range(0, n, batch_size):
                        part = folder / f"batch-{start:06d}.csv"
                        frame = _read_part(part, start, y[start:start + batch_size].tolist())
                        if frame is None:
                            if model is None:
                                model = load_run_model(run_dir, row)
                            _attack_batch(model, x, y, start, batch_size, name, options[name], dev, part)
                            frame = pd.read_csv(part)
                        frame.insert(0, "checkpoint", ckpt)
                        frame.insert(1, "split", split)
                        frame.insert(2, "attack", name)
                        part_frames.append(frame)
                        bar.update(min(batch_size, n - start))

    parts = pd.concat(part_frames, ignore_index=True)
    distances = parts[DISTANCE_COLUMNS].copy()
    distances["correct"] = distances["correct"].astype(int)
    curves = curves_frame(distances)
    costs = (parts.groupby(["checkpoint", "split", "attack"], sort=False)
             .agg(points=("index", "size"), attacked=("correct", "sum"), seconds=("seconds", "sum"),
                  forwards=("forwards", "sum"), backwards=("backwards", "sum"))
             .reset_index()[COST_COLUMNS])
    atomic_write_csv(out_dir / "distances.csv", distances)
    atomic_write_csv(out_dir / "curves.csv", curves)
    atomic_write_csv(out_dir / "costs.csv", costs)
    return distances, curves


def load_run_model(run_dir: Path, row) -> torch.nn.Module:
    """The model of one checkpoint-index row: a robustmargin checkpoint, or an evaluated user model."""
    from robustmargin.checkpoints import load_checkpoint
    from robustmargin.external import is_external, run_model

    if is_external(run_dir):
        return run_model(run_dir)
    return load_checkpoint(run_dir / "checkpoints" / str(row.file))[0]


def _read_part(part: Path, start: int, labels: list[int]) -> pd.DataFrame | None:
    """A finished batch holding exactly these points, or None if it must be (re)done (missing,
    a shorter last batch left by a smaller --n, or labels that no longer match the data)."""
    if not part.is_file():
        return None
    frame = pd.read_csv(part)
    same = frame["index"].tolist() == list(range(start, start + len(labels))) and frame["label"].tolist() == labels
    return frame if same else None


def _attack_batch(model: torch.nn.Module, x: Tensor, y: Tensor, start: int, batch_size: int, name: str,
                  options: dict[str, Any], device: torch.device, part: Path) -> None:
    """Attack one batch and save it atomically as a part file (cost is kept on the batch's first row)."""
    xb, yb = x[start:start + batch_size], y[start:start + batch_size]
    result = run_attack(model, xb.to(device), yb.to(device), name, batch_size=batch_size, device=device, **options)
    k = len(xb)
    frame = pd.DataFrame({
        "index": range(start, start + k),
        "label": yb.tolist(),
        "correct": result.correct.int().tolist(),
        "distance": result.distances.tolist(),
        "seconds": [result.seconds] + [0.0] * (k - 1),
        "forwards": [result.forwards] + [0] * (k - 1),
        "backwards": [result.backwards] + [0] * (k - 1),
    })
    atomic_write_csv(part, frame)
