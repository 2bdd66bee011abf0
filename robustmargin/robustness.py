"""Per-sample distances → robust-accuracy curves, and the attack stage of a run directory.

acc(ε) = (1/N) Σ_n 1[d_n > ε], where d_n is the smallest distance any attack found for
point n: 0 if the clean prediction is wrong, inf if no attack succeeded (so the point
counts as robust at every ε — an attack failure is never turned into a success).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from robustmargin.attacks.runner import (
    BUDGETS,
    ENSEMBLES,
    budget_options,
    get_attack,
    per_sample_minimum,
    run_attack,
)
from robustmargin import distributed
from robustmargin.distributed import World
from robustmargin.device import check_device, configure as configure_device
from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write_text
from robustmargin.rundir import (DISTANCE_COLUMNS, SETTINGS_FILE, SPLITS, AttackSettings, Run, Unit,
                                 adversarials_file, json_text, merge_lock, npz_bytes, part_path, read_adversarials,
                                 read_part, record_request, write_adversarials, write_part, write_view)


DEFAULT_POINTS = 101
CURVE_COLUMNS = ["checkpoint", "split", "epsilon", "robust_accuracy"]
COST_COLUMNS = ["checkpoint", "split", "attack", "points", "attacked", "seconds", "forwards", "backwards"]


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
    # float64 from the start: a float32 grid would move ε and misjudge distances within its rounding
    grid = (default_epsilons(best["distance"].to_numpy()) if epsilons is None
            else torch.as_tensor(epsilons, dtype=torch.float64).flatten().cpu())
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
#
# Every finished batch is one part file (robustmargin.rundir: keyed by the attack, its options, the batch
# size and the SHA-256 of the checkpoint file, so a retrained checkpoint never reuses old parts). A merge
# rebuilds one settings set's view from its parts and links it into place as one unit; concurrent merges
# on one machine are serialized by a file lock, and each rebuilds from all parts, so the union survives.

POINT_COLUMNS = ["checkpoint", "split", "index", "label", "correct", "distance", "best_attack", "spread"]


def resolve_attacks(names: Sequence[str] | str, budget: str = "fast") -> list[str]:
    """Attack names from a list or a comma list; "ensemble" expands to the budget's ensemble."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for name in names:
        for item in (ENSEMBLES[budget] if name == "ensemble" else (name,)):
            get_attack(item)  # unknown name → UserError
            if item not in out:
                out.append(item)
    if not out:
        raise UserError("no attack given")
    return out


def attack_settings(*, points: int, attacks: Sequence[str] | str = "ensemble", budget: str = "fast",
                    steps: int | None = None, batch_size: int = 100) -> AttackSettings:
    """The settings of an attack command, every value checked (one line each) before any work."""
    if budget not in BUDGETS:
        raise UserError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if points < 1 or batch_size < 1 or (steps is not None and steps < 1):
        raise UserError("--n, --batch-size and --steps must be at least 1")
    names = tuple(resolve_attacks(attacks, budget))
    return AttackSettings(points, names, budget, steps, batch_size,
                          {a: budget_options(a, budget, steps=steps) for a in names})


def read_settings(run_dir: str | Path) -> dict[str, Any] | None:
    """The settings.json of the current results (None when no attack has been merged)."""
    results = Run(run_dir).results()
    return None if results is None else results.settings


def settings_dir(run_dir: str | Path, settings_id: str) -> Path:
    return Path(run_dir) / "robustness" / "settings" / settings_id


def work_units(index: pd.DataFrame, splits: Sequence[str], settings: AttackSettings) -> list[Unit]:
    """Every unit, in the order of a single-process run: checkpoint, split, attack, batch."""
    return [Unit(str(r.name), str(r.sha256), split, attack, start, size)
            for r in index.itertuples(index=False) for split in splits for attack in settings.attacks
            for start, size in settings.batches()]


def _select_checkpoints(index: pd.DataFrame, checkpoints: Sequence[str] | str | None) -> pd.DataFrame:
    if checkpoints is None or checkpoints == "all":
        return index
    wanted = [c.strip() for c in checkpoints.split(",")] if isinstance(checkpoints, str) else list(checkpoints)
    names = list(index["name"])
    for name in wanted:
        if name not in names:
            raise UserError(f"unknown checkpoint {name!r}; this run has: {', '.join(map(str, names))}")
    return index[index["name"].isin(wanted)]


def check_attack_plan(cfg, n: int, *, device: str = "cpu", **settings) -> None:
    """Before a run is trained: the attack that will follow it (n points of each split of `cfg`'s data,
    these attack settings, this device) is possible, so that no training is wasted on a refused attack."""
    from robustmargin.data import load_data

    attack_settings(points=n, **settings)
    check_device(device)
    for split, (_, y) in load_data(cfg.data).items():
        if n > len(y):
            raise UserError(f"--n {n} is larger than the {split} split ({len(y)} points)")


def check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    for split in splits:
        if split not in SPLITS:
            raise UserError(f"split must be train or test, got {split!r}")
    return tuple(splits)


def evaluate_run(
    run_dir: str | Path | Run,
    *,
    splits: Sequence[str] = SPLITS,
    n: int = 100,
    attacks: Sequence[str] | str = "ensemble",
    checkpoints: Sequence[str] | str | None = None,
    budget: str = "fast",
    steps: int | None = None,
    batch_size: int = 100,
    device: str = "cpu",
    progress: bool = True,
    sharded: bool = True,
    masking: bool | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Attack the first `n` points of each split with every attack on every chosen checkpoint.

    The same points (the first n of the run's split, which data.py stores in a class-stratified order)
    are used for every checkpoint. Each finished batch is saved as a part file, so an interrupted
    evaluation resumes without redoing finished batches. At the end the parts are merged: the view of
    these settings then holds every checkpoint and split ever finished under them, not only the ones
    named now, and becomes the current results (robustness/distances.csv, curves.csv, costs.csv, points.csv).

    Launched by torchrun (and `sharded`), the missing batches are dealt out over the ranks, each on
    cuda:LOCAL_RANK or on its share of the CPU cores; rank 0 merges after all have finished. Give
    `sharded=False` to evaluate in this process alone when the ranks are doing other work.
    `masking` runs the gradient-masking check (a decision-based attack on a few points, see
    `masking_check`); by default on a user's model, not on a run trained here.
    Returns (distances, curves) of the merged view.
    """
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    settings = attack_settings(points=n, attacks=attacks, budget=budget, steps=steps, batch_size=batch_size)
    check_splits(splits)
    check_device(device)
    masking = (not run.has_history) if masking is None else masking
    configure_device(device)  # IEEE float32 on CUDA, as in training
    if not sharded:
        return _evaluate(run, settings, splits, checkpoints, torch.device(device), progress, World(), masking)
    with distributed.group(device) as w:
        return _evaluate(run, settings, splits, checkpoints, distributed.rank_device(device), progress, w, masking)


def _evaluate(run: Run, settings: AttackSettings, splits: Sequence[str], checkpoints, dev: torch.device,
              progress: bool, w: World, masking: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    from tqdm.auto import tqdm

    index = run.checkpoints()
    chosen = _select_checkpoints(index, checkpoints)
    for split in splits:
        if split not in run.splits:
            raise UserError(f"{run.path} has no {split} split")
    data = run.data()
    for split in splits:
        if settings.points > len(data[split][1]):
            raise UserError(f"--n {settings.points} is larger than the {split} split ({len(data[split][1])} points)")
    labels = {s: y.tolist() for s, (_, y) in data.items()}

    units = work_units(chosen, splits, settings)
    # every rank lists what is missing before any rank writes, so all deal the same list
    todo = [u for u in units if read_part(part_path(run.path, u, settings), u.start,
                                          labels[u.split][u.start:u.start + u.size]) is None]
    if w.is_main:
        with merge_lock(run.path):
            record_request(run.path, settings, [(u.checkpoint, u.split) for u in units])
    if w.size > 1:
        distributed.barrier()
    mine = distributed.deal(todo, w, snake=True)
    loaded: tuple[str, torch.nn.Module] | None = None
    with tqdm(total=sum(u.size for u in mine), desc="attack", unit="point",
              disable=not (progress and w.is_main), leave=False) as bar:
        for u in mine:
            if loaded is None or loaded[0] != u.checkpoint:
                file = str(chosen.loc[chosen["name"] == u.checkpoint, "file"].iloc[0])
                loaded = (u.checkpoint, run.load_model(file))
            bar.set_postfix_str(f"{u.checkpoint} {u.split} {u.attack}")
            x, y = (t[:settings.points] for t in data[u.split])  # the last batch ends at the n-th point
            _attack_batch(loaded[1], x, y, u.start, settings.batch_size, u.attack, settings.options[u.attack],
                          dev, part_path(run.path, u, settings))
            bar.update(u.size)
    if w.size > 1:
        distributed.wait_all()  # shares are uneven: a plain barrier would time out on the slowest rank
    if w.is_main:
        merge_results(run, settings, labels=labels, index=index)
        if masking:
            last = chosen.iloc[-1]
            check_masking(run, run.load_model(str(last.file)), str(last["name"]), splits[-1], dev)
    if w.size > 1:
        distributed.wait_all()  # the merge and the masking check can take long at paper scale
    results = run.results()
    return results.distances, results.curves


MASKING_POINTS = 10   # points of the masking check
MASKING_SUSPECTS = 2  # more than this many points beaten by the decision-based attack: the report warns
# a lighter HopSkipJump than its fast budget (about a quarter of the queries): the check looks for strong
# masking, where the gradient attacks end far above the boundary or fail, not for the last per cent
MASKING_OPTIONS = {"steps": 25, "max_gradient_eval_steps": 400}


def check_masking(run: Run, model: torch.nn.Module, checkpoint: str, split: str, device: torch.device) -> dict:
    """The gradient-masking check on the first MASKING_POINTS attacked points of (checkpoint, split): where
    the decision-based attack foolbox-hsj finds a distance more than 5 % below the gradient attacks' best,
    their distance is not to be trusted. Recorded in robustness/masking.json, which the report reads."""
    from robustmargin.attacks.masking import masking_check

    points = run.results().points
    points = points[(points["checkpoint"] == checkpoint) & (points["split"] == split)].sort_values("index")
    points = points.head(MASKING_POINTS)
    x, y = run.split(split)
    idx = torch.as_tensor(points["index"].to_numpy(copy=True))
    found = masking_check(model, x[idx].to(device), y[idx].to(device),
                          torch.as_tensor(points["distance"].to_numpy(float, copy=True)), device=device,
                          **MASKING_OPTIONS)
    record = {"checkpoint": checkpoint, "split": split, "points": points["index"].tolist(),
              "gradient": found.gradient.tolist(), "decision": found.decision.tolist(),
              "suspect": [int(points["index"].iloc[int(i)]) for i in found.suspect],
              "sha256": dict(zip(run.checkpoints()["name"], run.checkpoints()["sha256"])).get(checkpoint)}
    atomic_write_text(run.path / "robustness" / "masking.json", json_text(record))
    return record


def _attack_batch(model: torch.nn.Module, x: Tensor, y: Tensor, start: int, batch_size: int, name: str,
                  options: dict[str, Any], device: torch.device, part: Path) -> None:
    """Attack one batch and save it atomically as a part file (cost is kept on the batch's first row)."""
    xb, yb = x[start:start + batch_size], y[start:start + batch_size]
    result = run_attack(model, xb.to(device), yb.to(device), name, batch_size=batch_size, device=device, **options)
    k = len(xb)
    # the verified points first: the CSV, written last, marks the batch finished
    write_adversarials(part, result.adversarials.detach().float().cpu().numpy())
    write_part(part, pd.DataFrame({
        "index": range(start, start + k),
        "label": yb.tolist(),
        "correct": result.correct.int().tolist(),
        "distance": result.distances.tolist(),
        "seconds": [result.seconds] + [0.0] * (k - 1),
        "forwards": [result.forwards] + [0] * (k - 1),
        "backwards": [result.backwards] + [0] * (k - 1),
    }))


# --------------------------------------------------------------------------- merging the parts


def _csv_text(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, float_format="%.17g")


def collect(run_dir: Path, settings: AttackSettings, *, labels: dict[str, list[int]],
            index: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The part rows of every (checkpoint in `index`, split) whose batches under `settings` are all finished,
    and their verified points, row for row (None if a part predates them). `labels` are each split's labels
    (at least the first `settings.points`)."""
    frames, images = [], []
    for r in index.itertuples(index=False):
        for split in SPLITS:
            if split not in labels or len(labels[split]) < settings.points:
                continue
            group = []
            for u in work_units(index[index["name"] == r.name], [split], settings):
                frame = read_part(part_path(run_dir, u, settings), u.start, labels[split][u.start:u.start + u.size])
                if frame is None:
                    break
                frame.insert(0, "checkpoint", u.checkpoint)
                frame.insert(1, "split", split)
                frame.insert(2, "attack", u.attack)
                group.append((frame, read_adversarials(part_path(run_dir, u, settings), len(frame))))
            else:
                frames += [f for f, _ in group]
                images += [i for _, i in group]
    if not frames:
        return pd.DataFrame(columns=list(DISTANCE_COLUMNS) + ["seconds", "forwards", "backwards"]), None
    return (pd.concat(frames, ignore_index=True),
            np.concatenate(images) if all(i is not None for i in images) else None)


def merge_results(run: Run, settings: AttackSettings, *, labels: dict[str, list[int]],
                  index: pd.DataFrame) -> None:
    """Rebuild the view of `settings` (this set only) from all its parts and make it the current results."""
    with merge_lock(run.path):
        parts, images = collect(run.path, settings, labels=labels, index=index)
        write_view(run.path, settings.id, {**_result_texts(parts, settings, index),
                                           **_best_adversarials(parts, images)})


def _result_texts(parts: pd.DataFrame, settings: AttackSettings, index: pd.DataFrame) -> dict[str, str]:
    distances = parts[list(DISTANCE_COLUMNS)].copy()
    distances["correct"] = distances["correct"].astype(int)
    costs = (parts.groupby(["checkpoint", "split", "attack"], sort=False)
             .agg(points=("index", "size"), attacked=("correct", "sum"), seconds=("seconds", "sum"),
                  forwards=("forwards", "sum"), backwards=("backwards", "sum"))
             .reset_index()[COST_COLUMNS])
    # each merged (checkpoint, split) with the SHA-256 of the checkpoint file it came from
    sha = dict(zip(index["name"], index["sha256"]))
    units = distances[["checkpoint", "split"]].drop_duplicates().itertuples(index=False)
    record = {**settings.as_dict(), "results": [{"checkpoint": c, "split": s, "sha256": sha[c]} for c, s in units]}
    return {"distances.csv": _csv_text(distances), "curves.csv": _csv_text(curves_frame(distances)),
            "costs.csv": _csv_text(costs), "points.csv": _csv_text(point_summary(distances)),
            SETTINGS_FILE: json_text(record)}


def _best_adversarials(parts: pd.DataFrame, images: np.ndarray | None) -> dict[str, bytes]:
    """Per (checkpoint, split), the adversarial of each point that the best attack found (npz: index, x);
    points no attack succeeded on, or misclassified, have none."""
    if images is None or parts.empty:
        return {}
    d = parts["distance"].astype(float).to_numpy()
    ok = parts[np.isfinite(d) & (d > 0)]
    out = {}
    for (checkpoint, split), group in ok.groupby(["checkpoint", "split"], sort=False):
        best = group.loc[group.groupby("index", sort=True)["distance"].idxmin()]
        out[adversarials_file(checkpoint, split)] = npz_bytes(index=best["index"].to_numpy(np.int64),
                                                              x=images[best.index.to_numpy()])
    return out


def point_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """distances.csv rows → one row per point: the per-sample minimum, the attack that found it, and the
    spread max/min over the attacks that succeeded (finite positive distances). A spread above 1.05 marks a
    point whose attacks disagree by more than 5 %: its distance is the least certain. A point no attack
    succeeded on (or misclassified) has no best attack (empty) and no spread (empty, NaN)."""
    keys = ["checkpoint", "split", "index"]
    best = per_sample_best(frame)
    d = frame["distance"].astype(float)
    succeeded = frame[np.isfinite(d) & (d > 0)]
    if succeeded.empty:
        best["best_attack"], best["spread"] = "", math.nan
        return best[POINT_COLUMNS]
    grouped = succeeded.groupby(keys, sort=False)["distance"]
    stats = pd.DataFrame({"spread": grouped.max() / grouped.min()})
    stats["best_attack"] = succeeded.loc[grouped.idxmin(), "attack"].to_numpy()
    best = best.merge(stats.reset_index(), on=keys, how="left")
    best["best_attack"] = best["best_attack"].fillna("")
    return best[POINT_COLUMNS]
