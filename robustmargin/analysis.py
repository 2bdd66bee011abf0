"""Tables that relate margins, Lipschitz constants, certified radii, attack distances and KKT residuals.

`analyze_run(run_dir)` reads a run directory (metrics.csv, checkpoints/, robustness/ if present), loads
every checkpoint once, and writes RUN/tables/*.csv and *.md plus RUN/robustness/certified.csv:

- table1               the paper's Table 1 (loss, margins, accuracies at each checkpoint)
- lipschitz            per checkpoint and weight layer: σ_i (spectral norm), ρ_i (Frobenius norm)
- kkt                  KKT residuals ε (stationarity) and δ (complementary slackness) of (P)
- margin_vs_robustness per checkpoint and split: margins, Lipschitz factor, certified radius vs attack distance
- margins              per-sample normalized margins (the data behind the margin-distribution figure)

Two invariants are enforced because each one catching a violation means a stage is wrong:
certified radius ≤ attack distance for every attacked point, and smoothed ≤ normalized margin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from robustmargin.claims import CLAIM_COLUMNS, CLAIMS, CLAIMS_DESCRIPTION, claims_table  # noqa: F401 (re-exported)
from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write_csv, atomic_write_text

METRIC_COLUMNS = ("epoch", "log10_loss", "train_acc", "test_acc", "normalized_margin",
                  "normalized_margin_layerwise", "smoothed_normalized_margin")
DISTANCE_COLUMNS = ("checkpoint", "split", "index", "label", "correct", "attack", "distance")
CURVE_COLUMNS = ("checkpoint", "split", "epsilon", "robust_accuracy")
EPSILON_QUANTILES = {"small": 0.25, "medium": 0.5, "large": 0.75}
MAX_MARGIN_POINTS = 10000  # per checkpoint and split in margins.csv: enough for a distribution plot

# Certified radii come from float32 logits and attack distances from float32 images; a certified
# bound that is real never comes within 0.1 % of an attack distance, so anything closer is rounding.
CERTIFIED_RTOL, CERTIFIED_ATOL = 1e-3, 1e-6
SMOOTHED_RTOL = 1e-9  # γ̃ ≤ γ̄ holds exactly in float64 up to rounding of log-space sums

DESCRIPTIONS = {
    "table1": "The paper's Table 1: training loss (log10), normalized margin q_min/ρ^L, layer-wise "
              "normalized margin q_min/∏ρ_i^a_i, smoothed normalized margin, train and test accuracy at "
              "each checkpoint. source = metrics (metrics.csv at the checkpoint's epoch) or checkpoint "
              "(recomputed on the run's data).",
    "lipschitz": "Per weight layer: σ = spectral norm of the layer's linear operator, ρ = Frobenius norm "
                 "of its parameters, a = homogeneity order; sigma_product = ∏σ_i bounds the network's "
                 "L2 Lipschitz constant, rho_product = ∏ρ_i^a_i.",
    "kkt": "Distance of the normalized parameters from a KKT point of the max-margin problem (P), on the "
           "training set: eps = stationarity residual, delta = complementary slackness, k = samples of "
           "smallest margin used. Empty when the model is not homogeneous or the data is not separated.",
    "margin_vs_robustness": "Per checkpoint and split, over the n evaluated points (those attacked, else the "
                            "whole split): normalized margins (min and median over points), spectral-"
                            "normalized margin q_min/∏σ_i, the factor ∏ρ_i^a_i/∏σ_i relating the two, median "
                            "certified radius, median best attack distance (misclassified points count as 0), "
                            "median of distance/radius over correctly classified points, robust accuracy at "
                            "three ε (quartiles of all attack distances), KKT residuals (training set).",
    "claims": CLAIMS_DESCRIPTION,
}


NO_ATTACKS = ("No attack distances (robustness/distances.csv is absent): attack columns are omitted; "
              "run `robustmargin attack` and analyze again to add them.")


def describe(name: str, frame: pd.DataFrame) -> str:
    """The table's description, saying so when a run without attacks left the attack columns out."""
    if name == "margin_vs_robustness" and "median_distance" not in frame:
        return f"{DESCRIPTIONS[name]} {NO_ATTACKS}"
    return DESCRIPTIONS[name]


class InvariantError(UserError):
    """Two files on disk contradict a theorem: one of the stages that wrote them is wrong."""


@dataclass
class Analysis:
    tables: dict[str, pd.DataFrame]
    certified: pd.DataFrame
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading the run directory

def read_csv_checked(path: Path, columns: tuple[str, ...] = (), *, required: bool = True) -> pd.DataFrame | None:
    """A CSV with the given columns; a missing (when required), unreadable or incomplete file is a UserError."""
    if not path.is_file():
        if required:
            raise UserError(f"missing {path}")
        return None
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a readable CSV ({type(err).__name__})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{path} lacks columns {', '.join(missing)}")
    return frame


def check_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.toml)")
    return run_dir


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    frame = read_csv_checked(Path(run_dir) / "metrics.csv", METRIC_COLUMNS, required=True)
    if frame.empty:
        raise UserError(f"{Path(run_dir) / 'metrics.csv'} has no rows; train first")
    return frame


def read_distances(run_dir: str | Path) -> pd.DataFrame | None:
    """robustness/distances.csv, or None when no attack has run; distances parse 'inf' as float."""
    frame = read_csv_checked(Path(run_dir) / "robustness" / "distances.csv", DISTANCE_COLUMNS, required=False)
    if frame is not None:
        try:
            frame["distance"] = frame["distance"].astype(float)
        except ValueError:
            raise UserError("robustness/distances.csv has a distance that is not a number") from None
    return frame


def read_curves(run_dir: str | Path) -> pd.DataFrame | None:
    return read_csv_checked(Path(run_dir) / "robustness" / "curves.csv", CURVE_COLUMNS, required=False)


# ----------------------------------------------------------------------------- invariants

def check_certified(certified: pd.DataFrame, distances: pd.DataFrame) -> None:
    """Raise InvariantError at the first point where an attack beat the certified radius."""
    joined = distances.merge(certified, on=["checkpoint", "split", "index"], how="inner")
    bad = joined[joined["distance"] < joined["radius"] * (1 - CERTIFIED_RTOL) - CERTIFIED_ATOL]
    if len(bad):
        row = bad.iloc[0]
        raise InvariantError(
            f"checkpoint {row['checkpoint']} split {row['split']} index {int(row['index'])}: attack "
            f"{row['attack']} found distance {row['distance']:.6g} below the certified radius "
            f"{row['radius']:.6g} ({len(bad)} such points); the attack or the certificate is wrong")


def check_smoothed(metrics: pd.DataFrame) -> None:
    """γ̃ ≤ γ̄ (both normalized by ρ^L) on every metrics row where both are finite (SCIENCE.md §4)."""
    s, m = metrics["smoothed_normalized_margin"], metrics["normalized_margin"]
    ok = ~(np.isfinite(s) & np.isfinite(m)) | (s <= m + SMOOTHED_RTOL * m.abs())
    if not ok.all():
        row = metrics[~ok].iloc[0]
        raise InvariantError(f"metrics.csv epoch {int(row['epoch'])}: smoothed normalized margin "
                             f"{row['smoothed_normalized_margin']:.10g} exceeds the normalized margin "
                             f"{row['normalized_margin']:.10g}; the metrics are wrong")


# ----------------------------------------------------------------------------- per-checkpoint statistics

@dataclass
class SplitStats:
    margins: np.ndarray      # q_n on the whole split, float64
    log_sum_loss: float      # log Σ_n ℓ_n on the whole split
    eval_index: np.ndarray   # points evaluated against attacks (distances.csv indices, else all)
    radii: np.ndarray | None  # certified radius per eval_index point (None: no certificate for this model)


@dataclass
class CheckpointStats:
    name: str
    epoch: int
    kinds: list[str]
    orders: list[int]
    rhos: list[float]
    sigmas: list[float]
    certifiable: bool  # whether ∏σ_i bounds the Lipschitz constant (certified radii exist)
    splits: dict[str, SplitStats]
    kkt: dict | None

    @property
    def rho(self) -> float:
        return math.sqrt(sum(r * r for r in self.rhos))

    @property
    def rho_product(self) -> float:
        return math.exp(sum(a * math.log(r) for r, a in zip(self.rhos, self.orders)))

    @property
    def sigma_product(self) -> float:
        return math.prod(self.sigmas)


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).float().cpu() for i in range(0, len(x), batch)])


def checkpoint_stats(model, name: str, epoch: int, data: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     eval_index: dict[str, np.ndarray], *, loss: str, kkt_k: int) -> CheckpointStats:
    """Everything the tables need from one model, computed with one forward pass per split."""
    from robustmargin import lipschitz, kkt
    from robustmargin.losses import log_sum, sample_log_losses
    from robustmargin.margins import sample_margins

    sigmas = [float(s) for s in lipschitz.layer_spectral_norms(model)]
    try:  # the product bound needs 1-Lipschitz maps between layers (squared ReLU is not)
        lipschitz.check_one_lipschitz_between_layers(model)
        certifiable = True
    except UserError:
        certifiable = False
    splits = {}
    for split, (x, y) in data.items():
        logits = _logits(model, x)
        idx = eval_index[split]
        radii = None
        if certifiable:
            at = torch.as_tensor(idx, device=x.device)
            radii = lipschitz.certified_radii(model, x[at], y[at], sigmas=sigmas).double().cpu().numpy()
            radii = np.clip(radii, 0.0, None)  # misclassified points: radius 0
        splits[split] = SplitStats(margins=sample_margins(logits, y.cpu()).numpy(),
                                   log_sum_loss=float(log_sum(sample_log_losses(logits, y.cpu(), loss))),
                                   eval_index=idx, radii=radii)
    x, y = data["train"]
    separated = splits["train"].margins.min() > 0
    kkt_result = kkt.kkt_residuals(model, x, y, k=kkt_k) if model.is_homogeneous and separated else None
    layers = lipschitz.layer_table(model, sigmas)
    return CheckpointStats(name=name, epoch=epoch, kinds=[r["kind"] for r in layers],
                           orders=[r["order"] for r in layers], rhos=[r["rho"] for r in layers], sigmas=sigmas,
                           certifiable=certifiable, splits=splits, kkt=kkt_result)


# ----------------------------------------------------------------------------- tables

def table1(metrics: pd.DataFrame, stats: list[CheckpointStats], loss: str, order: int) -> pd.DataFrame:
    """One row per checkpoint from metrics.csv at its epoch, recomputed from the checkpoint otherwise."""
    from robustmargin.margins import smoothed_normalized_margin

    by_epoch = metrics.drop_duplicates("epoch", keep="last").set_index("epoch")
    rows = []
    for s in stats:
        train, test = s.splits["train"], s.splits["test"]
        q_min = float(train.margins.min())
        if s.epoch in by_epoch.index:
            m = by_epoch.loc[s.epoch]
            rows.append({"checkpoint": s.name, "epoch": s.epoch, "log10_loss": m["log10_loss"],
                         "normalized_margin": m["normalized_margin"],
                         "normalized_margin_layerwise": m["normalized_margin_layerwise"],
                         "smoothed_normalized_margin": m["smoothed_normalized_margin"],
                         "train_acc": m["train_acc"], "test_acc": m["test_acc"], "source": "metrics"})
        else:
            n = len(train.margins)
            rows.append({"checkpoint": s.name, "epoch": s.epoch,
                         "log10_loss": (train.log_sum_loss - math.log(n)) / math.log(10.0),
                         "normalized_margin": q_min / s.rho ** order,
                         "normalized_margin_layerwise": q_min / s.rho_product,
                         "smoothed_normalized_margin": smoothed_normalized_margin(train.log_sum_loss, loss,
                                                                                  s.rho ** order),
                         "train_acc": float((train.margins > 0).mean()),
                         "test_acc": float((test.margins > 0).mean()), "source": "checkpoint"})
    return pd.DataFrame(rows)


def lipschitz_table(stats: list[CheckpointStats]) -> pd.DataFrame:
    rows = []
    for s in stats:
        for i, (kind, a, rho) in enumerate(zip(s.kinds, s.orders, s.rhos)):
            sigma = s.sigmas[i]
            rows.append({"checkpoint": s.name, "epoch": s.epoch, "layer": i + 1, "kind": kind, "order": a,
                         "sigma": sigma, "rho": rho, "sigma_over_rho": sigma / rho,
                         "sigma_product": s.sigma_product, "rho_product": s.rho_product})
    return pd.DataFrame(rows)


def kkt_table(stats: list[CheckpointStats]) -> pd.DataFrame:
    rows = []
    for s in stats:
        k = s.kkt or {}
        rows.append({"checkpoint": s.name, "epoch": s.epoch, "q_min": float(s.splits["train"].margins.min()),
                     "eps": float(k.get("eps", math.nan)), "delta": float(k.get("delta", math.nan)),
                     "k": int(k["k_used"]) if "k_used" in k else pd.NA})
    return pd.DataFrame(rows).astype({"k": "Int64"})


def best_distances(distances: pd.DataFrame) -> pd.DataFrame:
    """Per point, the smallest distance any attack found (the ensemble of SCIENCE.md §7)."""
    return (distances.groupby(["checkpoint", "split", "index"], as_index=False)
            .agg(correct=("correct", "max"), distance=("distance", "min")))


def robust_accuracy(distances: np.ndarray, epsilon: float) -> float:
    """acc(ε) = (1/N) Σ 1[d_n > ε]."""
    return float((np.asarray(distances) > epsilon).mean())


def pick_epsilons(best: pd.DataFrame | None) -> dict[str, float]:
    """Small, medium and large ε: quartiles of all finite positive distances, to two significant digits,
    shared by every checkpoint and split so that rows compare at the same ε."""
    d = best["distance"].to_numpy() if best is not None else np.array([])
    d = d[np.isfinite(d) & (d > 0)]
    if not len(d):
        return {k: math.nan for k in EPSILON_QUANTILES}
    return {k: float(f"{np.quantile(d, q):.2g}") for k, q in EPSILON_QUANTILES.items()}


def margin_vs_robustness(stats: list[CheckpointStats], best: pd.DataFrame | None,
                         epsilons: dict[str, float], order: int) -> pd.DataFrame:
    rows = []
    for s in stats:
        for split, st in s.splits.items():
            q = st.margins[st.eval_index]
            row = {"checkpoint": s.name, "epoch": s.epoch, "split": split, "n": len(q),
                   "accuracy": float((q > 0).mean()),
                   "normalized_margin": q.min() / s.rho ** order,
                   "normalized_margin_layerwise": q.min() / s.rho_product,
                   "median_normalized_margin_layerwise": float(np.median(q)) / s.rho_product,
                   "spectral_margin": q.min() / s.sigma_product,
                   "rho_over_sigma": s.rho_product / s.sigma_product,
                   "median_radius": float(np.median(st.radii)) if st.radii is not None else math.nan}
            d = None
            if best is not None:
                part = best[(best["checkpoint"] == s.name) & (best["split"] == split)].set_index("index")
                if len(part):
                    d = part["distance"].reindex(st.eval_index).to_numpy()
            if d is not None:
                row["median_distance"] = float(np.median(d))
                if st.radii is not None:
                    use = (q > 0) & np.isfinite(d) & (st.radii > 0)
                    row["median_distance_over_radius"] = (float(np.median(d[use] / st.radii[use]))
                                                          if use.any() else math.nan)
                for size, eps in epsilons.items():
                    row[f"eps_{size}"] = eps
                    row[f"robust_acc_{size}"] = robust_accuracy(d, eps) if math.isfinite(eps) else math.nan
            kkt = s.kkt or {}
            row["kkt_eps"] = float(kkt.get("eps", math.nan))
            row["kkt_delta"] = float(kkt.get("delta", math.nan))
            rows.append(row)
    return pd.DataFrame(rows)


def margins_table(stats: list[CheckpointStats]) -> pd.DataFrame:
    """Per-sample margins, at most MAX_MARGIN_POINTS evenly spaced points per checkpoint and split."""
    parts = []
    for s in stats:
        for split, st in s.splits.items():
            n = len(st.margins)
            idx = np.unique(np.linspace(0, n - 1, min(n, MAX_MARGIN_POINTS)).astype(int))
            parts.append(pd.DataFrame({"checkpoint": s.name, "epoch": s.epoch, "split": split, "index": idx,
                                       "margin": st.margins[idx],
                                       "normalized_margin_layerwise": st.margins[idx] / s.rho_product}))
    return pd.concat(parts, ignore_index=True)


def certified_table(stats: list[CheckpointStats]) -> pd.DataFrame:
    parts = [pd.DataFrame({"checkpoint": s.name, "split": split, "index": st.eval_index, "radius": st.radii})
             for s in stats for split, st in s.splits.items() if st.radii is not None]
    return (pd.concat(parts, ignore_index=True) if parts
            else pd.DataFrame(columns=["checkpoint", "split", "index", "radius"]))


# ----------------------------------------------------------------------------- markdown

def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is pd.NA else str(value)


def to_markdown(frame: pd.DataFrame, title: str = "", description: str = "") -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional tabulate package)."""
    lines = [f"# {title}", ""] if title else []
    if description:
        lines += [description, ""]
    lines.append("| " + " | ".join(frame.columns) + " |")
    lines.append("|" + "|".join("---:" if pd.api.types.is_numeric_dtype(frame[c]) else "---"
                                for c in frame.columns) + "|")
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def read_points(run_dir: str | Path, distances: pd.DataFrame | None) -> pd.DataFrame | None:
    """robustness/points.csv (per point: the per-sample minimum and the spread), from distances.csv when
    the attack stage predates it."""
    from robustmargin.robustness import POINT_COLUMNS, point_summary

    path = Path(run_dir) / "robustness" / "points.csv"
    frame = read_csv_checked(path, tuple(POINT_COLUMNS), required=False)
    if frame is None:
        return None if distances is None else point_summary(distances)
    frame["distance"] = frame["distance"].astype(float)
    return frame


def read_runs(run_dir: Path, metrics: pd.DataFrame) -> dict[str, tuple[str, pd.DataFrame]]:
    """This run and its companions (RUN/companions/NAME/), keyed by a legend label, with their schedules."""
    from robustmargin.config import load_config

    schedule = load_config(run_dir / "config.toml").train.schedule
    runs = {f"{schedule} (this run)": (schedule, metrics)}
    folder = run_dir / "companions"
    for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
        if (sub / "config.toml").is_file() and (sub / "metrics.csv").is_file():
            other = load_config(sub / "config.toml").train.schedule
            label = other if sub.name == other else f"{other} ({sub.name})"
            runs[label] = (other, read_metrics(sub))
    return runs


# ----------------------------------------------------------------------------- the stage

def _eval_indices(distances: pd.DataFrame | None, name: str, split: str, n: int) -> np.ndarray:
    if distances is not None:
        part = distances[(distances["checkpoint"] == name) & (distances["split"] == split)]
        if len(part):
            idx = np.unique(part["index"].to_numpy().astype(int))
            if idx.min() < 0 or idx.max() >= n:
                raise UserError(f"robustness/distances.csv: checkpoint {name} split {split} has index "
                                f"{idx.max() if idx.max() >= n else idx.min()} outside the split (size {n})")
            return idx
    return np.arange(n)


def _check_labels(distances: pd.DataFrame, data: dict) -> None:
    """The attack stage saw the same data: its labels must be the run's labels at those indices."""
    for split, part in distances.groupby("split"):
        if split not in data:
            raise UserError(f"robustness/distances.csv has unknown split {split!r}")
        y = data[split][1].cpu().numpy()
        idx = part["index"].to_numpy().astype(int)
        ok = (idx >= 0) & (idx < len(y))
        wrong = part[ok][y[idx[ok]] != part["label"].to_numpy()[ok]]
        if len(wrong):
            r = wrong.iloc[0]
            raise UserError(f"robustness/distances.csv: split {split} index {int(r['index'])} has label "
                            f"{int(r['label'])} but the run's data has {int(y[int(r['index'])])}")


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but torch sees no CUDA device")


def analyze_run(run_dir: str | Path, *, device: str = "cpu", kkt_k: int = 100, progress: bool = True,
                write: bool = True) -> Analysis:
    """Compute every table of a run and (by default) write them under RUN/tables and RUN/robustness."""
    from robustmargin.checkpoints import load_checkpoint, read_index
    from robustmargin.data import load_data, run_config
    from robustmargin.external import analyze_external, is_external

    run_dir = check_run_dir(run_dir)
    _check_device(device)
    if kkt_k < 1:
        raise UserError(f"kkt_k must be at least 1, got {kkt_k}")
    if is_external(run_dir):  # a user's model: no training history, and only some bounds apply
        return analyze_external(run_dir, device=device, kkt_k=kkt_k, progress=progress, write=write)
    cfg = run_config(run_dir)
    metrics = read_metrics(run_dir)
    index = read_index(run_dir)
    if index.empty:
        raise UserError(f"{run_dir / 'checkpoints' / 'index.csv'} lists no checkpoints")
    distances = read_distances(run_dir)
    if distances is not None:
        unknown = sorted(set(distances["checkpoint"]) - set(index["name"]))
        if unknown:
            raise UserError(f"robustness/distances.csv names checkpoints not in the index: {', '.join(unknown)}")
    notes: list[str] = []
    check_smoothed(metrics)

    data = {k: (x.to(device), y.to(device)) for k, (x, y) in load_data(cfg.data).items()}
    if distances is not None:
        _check_labels(distances, data)
    stats, order = [], None
    for row in tqdm(list(index.itertuples(index=False)), desc="analyze", unit="checkpoint", disable=not progress):
        model, _ = load_checkpoint(run_dir / "checkpoints" / row.file)
        model = model.to(device).eval()
        order = model.order
        eval_index = {s: _eval_indices(distances, row.name, s, len(data[s][1])) for s in data}
        stats.append(checkpoint_stats(model, row.name, int(row.epoch), data, eval_index,
                                      loss=cfg.train.loss, kkt_k=kkt_k))
    if not stats[0].certifiable:
        notes.append("certified radii skipped: the activation is not 1-Lipschitz")

    certified = certified_table(stats)
    if distances is not None and len(certified):
        check_certified(certified, distances)
    best = best_distances(distances) if distances is not None else None
    epsilons = pick_epsilons(best)
    tables = {"table1": table1(metrics, stats, cfg.train.loss, order),
              "lipschitz": lipschitz_table(stats),
              "kkt": kkt_table(stats),
              "margin_vs_robustness": margin_vs_robustness(stats, best, epsilons, order),
              "margins": margins_table(stats)}
    grid = [e for e in epsilons.values() if math.isfinite(e)]
    tables["claims"] = claims_table(metrics, tables, read_points(run_dir, distances), read_runs(run_dir, metrics),
                                    sorted(set(grid)))
    notes += _consistency_notes(tables["table1"], stats, order)
    if distances is None:
        notes.append("no robustness/distances.csv: the tables have no attack columns; "
                     "run `robustmargin attack` first")
    result = Analysis(tables=tables, certified=certified, warnings=notes)
    if write:
        write_tables(run_dir, result)
    return result


def _consistency_notes(t1: pd.DataFrame, stats: list[CheckpointStats], order: int) -> list[str]:
    """metrics.csv and the checkpoint should agree on the margin; say so when they do not."""
    notes = []
    for row, s in zip(t1.itertuples(index=False), stats):
        if row.source != "metrics":
            continue
        recomputed = float(s.splits["train"].margins.min()) / s.rho ** order
        if not math.isclose(recomputed, row.normalized_margin, rel_tol=1e-3, abs_tol=1e-12):
            notes.append(f"checkpoint {s.name}: normalized margin {recomputed:.6g} recomputed from the checkpoint "
                         f"differs from metrics.csv ({row.normalized_margin:.6g})")
    return notes


def write_tables(run_dir: str | Path, result: Analysis) -> None:
    tables_dir = Path(run_dir) / "tables"
    for name, frame in result.tables.items():
        atomic_write_csv(tables_dir / f"{name}.csv", frame)
        if name in DESCRIPTIONS:  # margins.csv is per-sample data, not a table to read
            atomic_write_text(tables_dir / f"{name}.md", to_markdown(frame, name, describe(name, frame)))
    atomic_write_csv(Path(run_dir) / "robustness" / "certified.csv", result.certified)
