"""Per-sample distances → robust-accuracy curves, and the attack stage of a run directory.

acc(ε) = (1/N) Σ_n 1[d_n > ε], where d_n is the smallest distance any attack found for
point n: 0 if the clean prediction is wrong, inf if no attack succeeded (so the point
counts as robust at every ε — an attack failure is never turned into a success).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
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
from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write_csv, atomic_write_text


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
# Storage: every finished batch is one part file, robustness/parts/CKPT/SPLIT/ATTACK-KEY/batch-START-SIZE.csv,
# where KEY names the attack's options, the batch size and the checkpoint's identity (file, epoch, loss),
# so a retrained checkpoint never reuses old parts. The merged files are views over the parts:
# for every settings set (points, attacks and their options, batch size; see `AttackSettings`)
# robustness/settings/ID/ holds distances.csv, curves.csv, costs.csv, points.csv and settings.json,
# built from every (checkpoint, split) whose parts under those settings are complete, whatever the command
# that made them named. robustness/*.csv and robustness/settings.json are a copy of the set the last attack
# command used: the files analysis and the report read.

SETTINGS_FILE = "settings.json"
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


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class AttackSettings:
    """What makes attack results comparable: the same first `points` of a split, the same attacks with the
    same options, the same batches. Results under different settings are never merged into one curve."""

    points: int
    attacks: tuple[str, ...]
    budget: str
    steps: int | None
    batch_size: int
    options: dict[str, dict[str, Any]]  # per attack, as the attack functions take them

    @classmethod
    def make(cls, *, points: int, attacks: Sequence[str] | str, budget: str, steps: int | None,
             batch_size: int) -> "AttackSettings":
        names = tuple(resolve_attacks(attacks, budget))
        return cls(points, names, budget, steps, batch_size, {a: budget_options(a, budget, steps=steps) for a in names})

    @property
    def id(self) -> str:
        return _digest({"points": self.points, "attacks": list(self.attacks), "options": self.options,
                        "batch_size": self.batch_size})

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "points": self.points, "attacks": list(self.attacks), "budget": self.budget,
                "steps": self.steps, "batch_size": self.batch_size, "options": self.options}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AttackSettings":
        return cls(int(d["points"]), tuple(d["attacks"]), str(d["budget"]),
                   None if d["steps"] is None else int(d["steps"]), int(d["batch_size"]), dict(d["options"]))

    def batches(self) -> list[tuple[int, int]]:
        """(start, size) of each batch of the first `points` points."""
        return [(s, min(self.batch_size, self.points - s)) for s in range(0, self.points, self.batch_size)]


def describe_settings(settings: dict[str, Any]) -> str:
    """One line for tables and reports, from a settings.json dict."""
    steps = "" if settings.get("steps") is None else f", steps {settings['steps']}"
    return (f"attacks {' + '.join(settings['attacks'])} ({settings['budget']} budget{steps}, per-sample minimum) "
            f"on the first {settings['points']} points of each split, batches of {settings['batch_size']} "
            f"(settings {settings['id']})")


def read_settings(run_dir: str | Path) -> dict[str, Any] | None:
    """robustness/settings.json: the settings behind robustness/distances.csv (None if not recorded)."""
    path = Path(run_dir) / "robustness" / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON") from None


@dataclass(frozen=True)
class Unit:
    """One work unit: one batch of one split of one checkpoint under one attack."""

    checkpoint: str
    file: str
    epoch: int
    log10_loss: float
    split: str
    attack: str
    start: int
    size: int


def work_units(index: pd.DataFrame, splits: Sequence[str], settings: AttackSettings) -> list[Unit]:
    """Every unit, in the order of a single-process run: checkpoint, split, attack, batch."""
    return [Unit(str(r.name), str(r.file), int(r.epoch), float(r.log10_loss), split, attack, start, size)
            for r in index.itertuples(index=False) for split in splits for attack in settings.attacks
            for start, size in settings.batches()]


def part_path(run_dir: Path, unit: Unit, settings: AttackSettings) -> Path:
    # the points are not in the key: batches cover fixed index ranges, so a larger --n reuses the full ones
    key = _digest({"attack": unit.attack, "options": settings.options[unit.attack],
                   "batch_size": settings.batch_size, "file": unit.file, "epoch": unit.epoch,
                   "log10_loss": unit.log10_loss})
    return (run_dir / "robustness" / "parts" / unit.checkpoint / unit.split / f"{unit.attack}-{key}"
            / f"batch-{unit.start:06d}-{unit.size}.csv")


def _read_part(part: Path, start: int, labels: list[int]) -> pd.DataFrame | None:
    """A finished batch holding exactly these points, or None if it must be (re)done (missing, or
    labels that no longer match the data)."""
    if not part.is_file():
        return None
    frame = pd.read_csv(part)
    same = frame["index"].tolist() == list(range(start, start + len(labels))) and frame["label"].tolist() == labels
    return frame if same else None


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
    attacks: Sequence[str] | str = "ensemble",
    checkpoints: Sequence[str] | str | None = None,
    budget: str = "fast",
    steps: int | None = None,
    batch_size: int = 100,
    device: str = "cpu",
    progress: bool = True,
    sharded: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Attack the first `n` points of each split with every attack on every chosen checkpoint.

    The same points (the first n of the run's split, which data.py stores in a class-stratified order)
    are used for every checkpoint. Each finished batch is saved as a part file, so an interrupted
    evaluation resumes without redoing finished batches. At the end the parts are merged (see above):
    robustness/distances.csv, curves.csv, costs.csv and points.csv then hold every checkpoint and split
    ever finished under these settings, not only the ones named now.

    Launched by torchrun (and `sharded`), the missing batches are dealt out over the ranks, each on
    cuda:LOCAL_RANK or on its share of the CPU cores; rank 0 merges after all have finished. Give
    `sharded=False` to evaluate in this process alone when the ranks are doing other work.
    Returns (distances, curves) of the merged files.
    """
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
    settings = AttackSettings.make(points=n, attacks=attacks, budget=budget, steps=steps, batch_size=batch_size)
    _device(device)
    if not sharded:
        return _evaluate(run_dir, settings, splits, checkpoints, torch.device(device), progress, World())
    with distributed.group(device) as w:
        return _evaluate(run_dir, settings, splits, checkpoints, distributed.rank_device(device), progress, w)


def _evaluate(run_dir: Path, settings: AttackSettings, splits: Sequence[str], checkpoints, dev: torch.device,
              progress: bool, w: World) -> tuple[pd.DataFrame, pd.DataFrame]:
    from tqdm.auto import tqdm

    from robustmargin.checkpoints import read_index
    from robustmargin.data import load_run_data

    index = read_index(run_dir)
    chosen = _select_checkpoints(index, checkpoints)
    if chosen.empty:
        raise UserError(f"{run_dir} has no checkpoints")
    data = load_run_data(run_dir)
    for split in splits:
        if split not in data:
            raise UserError(f"{run_dir} has no {split} split")
        if settings.points > len(data[split][1]):
            raise UserError(f"--n {settings.points} is larger than the {split} split ({len(data[split][1])} points)")
    data = {s: (x[:settings.points], y[:settings.points]) for s, (x, y) in data.items()}
    labels = {s: y.tolist() for s, (_, y) in data.items()}

    units = work_units(chosen, splits, settings)
    # every rank lists what is missing before any rank writes, so all deal the same list
    todo = [u for u in units if _read_part(part_path(run_dir, u, settings), u.start,
                                           labels[u.split][u.start:u.start + u.size]) is None]
    if w.is_main:
        _record_request(run_dir, settings, [(u.checkpoint, u.split) for u in units])
    if w.size > 1:
        distributed.barrier()
    mine = distributed.deal(todo, w, snake=True)
    loaded: tuple[str, torch.nn.Module] | None = None
    with tqdm(total=sum(u.size for u in mine), desc="attack", unit="point",
              disable=not (progress and w.is_main), leave=False) as bar:
        for u in mine:
            if loaded is None or loaded[0] != u.checkpoint:
                loaded = (u.checkpoint, load_run_model(run_dir, u.file))
            bar.set_postfix_str(f"{u.checkpoint} {u.split} {u.attack}")
            x, y = data[u.split]
            _attack_batch(loaded[1], x, y, u.start, settings.batch_size, u.attack, settings.options[u.attack],
                          dev, part_path(run_dir, u, settings))
            bar.update(u.size)
    if w.size > 1:
        distributed.barrier()
    if w.is_main:
        merge_results(run_dir, settings, labels=labels, index=index)
    if w.size > 1:
        distributed.barrier()
    out_dir = run_dir / "robustness"
    distances = pd.read_csv(out_dir / "distances.csv")
    return distances, pd.read_csv(out_dir / "curves.csv")


def load_run_model(run_dir: Path, file: str) -> torch.nn.Module:
    """The model of one checkpoint file: a robustmargin checkpoint, or an evaluated user model."""
    from robustmargin.checkpoints import load_checkpoint
    from robustmargin.external import is_external, run_model

    if is_external(run_dir):
        return run_model(run_dir)
    return load_checkpoint(run_dir / "checkpoints" / str(file))[0]


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


# --------------------------------------------------------------------------- merging the parts


def settings_dir(run_dir: str | Path, settings_id: str) -> Path:
    return Path(run_dir) / "robustness" / "settings" / settings_id


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None  # a damaged record is rebuilt by the next attack command


def _record_request(run_dir: Path, settings: AttackSettings, requested: list[tuple[str, str]]) -> None:
    """Add the (checkpoint, split) pairs asked for to the set's record, before any work: `status` can then
    tell a finished set from one that a kill left partial."""
    path = settings_dir(run_dir, settings.id) / SETTINGS_FILE
    record = read_record(path) or {**settings.as_dict(), "requested": [], "results": []}
    pairs = [(r["checkpoint"], r["split"]) for r in record["requested"]]
    wanted = [{"checkpoint": c, "split": s} for c, s in dict.fromkeys(pairs + requested)]
    if wanted != record["requested"]:
        atomic_write_text(path, json.dumps({**record, "requested": wanted}, indent=1) + "\n")


def _write_text_if_changed(path: Path, text: str) -> None:
    """Unchanged results keep their file times, so later stages do not look stale after a no-op rerun."""
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text)


def _csv_text(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, float_format="%.17g")


def collect(run_dir: str | Path, settings: AttackSettings, *, labels: dict[str, list[int]],
            index: pd.DataFrame) -> pd.DataFrame:
    """The part rows of every (checkpoint in `index`, split) whose batches under `settings` are all finished."""
    run_dir = Path(run_dir)
    frames = []
    for r in index.itertuples(index=False):
        for split in SPLITS:
            if split not in labels or len(labels[split]) < settings.points:
                continue
            group = []
            for u in work_units(index[index["name"] == r.name], [split], settings):
                frame = _read_part(part_path(run_dir, u, settings), u.start,
                                   labels[split][u.start:u.start + u.size])
                if frame is None:
                    break
                frame.insert(0, "checkpoint", u.checkpoint)
                frame.insert(1, "split", split)
                frame.insert(2, "attack", u.attack)
                group.append(frame)
            else:
                frames += group
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=DISTANCE_COLUMNS + ["seconds", "forwards", "backwards"])


def merge_results(run_dir: str | Path, settings: AttackSettings, *, labels: dict[str, list[int]],
                  index: pd.DataFrame) -> None:
    """Rebuild the merged files of every recorded settings set from the parts; `settings` is the current
    set, copied to robustness/. Files whose content did not change are left untouched."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "robustness"
    recorded = {settings.id: settings}
    for path in sorted((out_dir / "settings").glob(f"*/{SETTINGS_FILE}")):
        record = read_record(path)
        if record is not None and record.get("id") == path.parent.name:
            try:
                recorded.setdefault(record["id"], AttackSettings.from_dict(record))
            except (KeyError, TypeError, ValueError):
                continue
    for sid, s in recorded.items():
        texts = _result_texts(collect(run_dir, s, labels=labels, index=index), s, settings_dir(run_dir, sid), index)
        for name, text in texts.items():
            _write_text_if_changed(settings_dir(run_dir, sid) / name, text)
            if sid == settings.id:
                _write_text_if_changed(out_dir / name, text)


def _result_texts(parts: pd.DataFrame, settings: AttackSettings, folder: Path, index: pd.DataFrame
                  ) -> dict[str, str]:
    distances = parts[DISTANCE_COLUMNS].copy()
    distances["correct"] = distances["correct"].astype(int)
    costs = (parts.groupby(["checkpoint", "split", "attack"], sort=False)
             .agg(points=("index", "size"), attacked=("correct", "sum"), seconds=("seconds", "sum"),
                  forwards=("forwards", "sum"), backwards=("backwards", "sum"))
             .reset_index()[COST_COLUMNS])
    # each merged (checkpoint, split) with the checkpoint's identity, so that `status` sees a retrained one
    rows = {str(r.name): r for r in index.itertuples(index=False)}
    units = distances[["checkpoint", "split"]].drop_duplicates().itertuples(index=False)
    record = read_record(folder / SETTINGS_FILE) or {}
    results = {**settings.as_dict(), "requested": record.get("requested", []),
               "results": [{"checkpoint": c, "split": s, "epoch": int(rows[c].epoch),
                            "log10_loss": float(rows[c].log10_loss), "file": str(rows[c].file)} for c, s in units]}
    return {"distances.csv": _csv_text(distances), "curves.csv": _csv_text(curves_frame(distances)),
            "costs.csv": _csv_text(costs), "points.csv": _csv_text(point_summary(distances)),
            SETTINGS_FILE: json.dumps(results, indent=1) + "\n"}


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
