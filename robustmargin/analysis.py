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

from robustmargin.claims import CLAIMS_DESCRIPTION, N_BOOT, claims_table
from robustmargin.device import check_device, configure as configure_device
from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write_csv, atomic_write_text
from robustmargin.rundir import NOTES, PROVENANCE, ROBUSTNESS, TABLES, Run
from robustmargin.stats import binomial_interval

METRIC_COLUMNS = ("epoch", "log10_loss", "train_acc", "test_acc", "normalized_margin",
                  "normalized_margin_layerwise", "smoothed_normalized_margin")
DISTANCE_COLUMNS = ("checkpoint", "split", "index", "label", "correct", "attack", "distance")
CURVE_COLUMNS = ("checkpoint", "split", "epsilon", "robust_accuracy")
EPSILON_QUANTILES = {"small": 0.25, "medium": 0.5, "large": 0.75}
SPREAD_DOUBT = 1.05  # attacks disagreeing by more than 5 % on a point: its distance is the least certain
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
    "robust_accuracy": "Robust accuracy (fraction of the attacked points whose best attack distance exceeds "
                       "ε; misclassified points count as not robust) with an exact 95 % (Clopper-Pearson) interval, at the ε "
                       "chosen with --eps (source chosen) or else at the quartiles of all attack distances "
                       "(source quartile).",
    "summary": "Per checkpoint and split, over the attacked points (else the whole split): clean accuracy, "
               "median best attack distance with a 95 % bootstrap interval, median certified radius, and the "
               "points whose attacks disagree by more than 5 % (doubtful; `--budget strong` tightens them).",
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
class Applies:
    """What the analysis can say about one model: for a robustmargin network, its chain of layers (`net`);
    for any other module, a Lipschitz bound over its traced graph (`bound`, None: left out); whether it
    certifies radii, its homogeneity order (None: not homogeneous), and why anything is left out."""

    net: torch.nn.Module | None
    bound: object | None  # lipschitz.GraphBound
    certifiable: bool
    order: int | None
    homogeneous: bool
    notes: list[str]


def what_applies(model: torch.nn.Module, x_probe: torch.Tensor) -> Applies:
    """For a robustmargin network, its declared structure; for any other module, what the graph bound and a
    numerical homogeneity test find (robustmargin.lipschitz, robustmargin.usermodel)."""
    from robustmargin import lipschitz
    from robustmargin.models import HomogeneousNet
    from robustmargin.usermodel import homogeneity_order

    notes = []
    if isinstance(model, HomogeneousNet):
        try:  # the product bound needs 1-Lipschitz maps between layers (squared ReLU is not)
            lipschitz.check_one_lipschitz_between_layers(model)
            certifiable = True
        except UserError:
            certifiable = False
            notes.append("certified radii skipped: the activation is not 1-Lipschitz")
        return Applies(model, None, certifiable, model.order, model.is_homogeneous, notes)
    bound, why = lipschitz.graph_bound(model, x_probe)
    if bound is None:
        notes.append(f"Lipschitz bound and certified radii left out: {why}.")
    order = homogeneity_order(model, x_probe)
    if order is None:
        notes.append("normalized margins and KKT residuals left out: f(cθ) ≠ c^L f(θ) numerically "
                     "(the model is not homogeneous in its parameters).")
    return Applies(None, bound, bound is not None, order, order is not None, notes)


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
    order: float = math.nan    # homogeneity order L (NaN: not homogeneous)
    layerwise: bool = True     # whether ∏ρ_i^a_i is the homogeneous norm product (a robustmargin network)
    bound: float | None = None  # a graph's Lipschitz bound (a user's module), in place of ∏σ_i
    graph_rows: list[dict] = field(default_factory=list)  # its operations that are not 1-Lipschitz

    @property
    def rho(self) -> float:
        return math.sqrt(sum(r * r for r in self.rhos))

    @property
    def rho_product(self) -> float:
        if not self.layerwise:
            return math.nan
        return math.exp(sum(a * math.log(r) for r, a in zip(self.rhos, self.orders)))

    @property
    def sigma_product(self) -> float:
        if self.bound is not None:
            return self.bound
        return math.prod(self.sigmas) if self.sigmas else math.nan


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).float().cpu() for i in range(0, len(x), batch)])


def checkpoint_stats(model, applies: Applies, name: str, epoch: int, data: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     eval_index: dict[str, np.ndarray], *, loss: str, kkt_k: int, notes: list[str]) -> CheckpointStats:
    """Everything the tables need from one model, computed with one forward pass per split."""
    from robustmargin import kkt, lipschitz
    from robustmargin.losses import log_sum, sample_log_losses
    from robustmargin.margins import sample_margins
    from robustmargin.usermodel import Homogeneous

    net, bound = applies.net, applies.bound
    sigmas = [float(s) for s in lipschitz.layer_spectral_norms(net)] if net is not None else []
    splits = {}
    for split, (x, y) in data.items():
        logits = _logits(model, x)
        idx = eval_index[split]
        radii = None
        if applies.certifiable:
            at = torch.as_tensor(idx, device=x.device)
            radii = (lipschitz.certified_radii(net, x[at], y[at], sigmas=sigmas) if net is not None
                     else bound.certified_radii(x[at], y[at]))
            radii = np.clip(radii.double().cpu().numpy(), 0.0, None)  # misclassified points: radius 0
        splits[split] = SplitStats(margins=sample_margins(logits, y.cpu()).numpy(),
                                   log_sum_loss=float(log_sum(sample_log_losses(logits, y.cpu(), loss))),
                                   eval_index=idx, radii=radii)
    kkt_result = None
    if applies.homogeneous:
        if "train" not in splits:
            notes.append("KKT residuals left out: the data has no training split.")
        elif splits["train"].margins.min() <= 0:
            notes.append(f"KKT residuals of {name} left out: the model does not classify every training point "
                         f"correctly.")
        else:
            target = model if net is model else Homogeneous(model, applies.order)
            kkt_result = kkt.kkt_residuals(target, *data["train"], k=kkt_k)
    graph_rows: list[dict] = []
    if net is not None:
        layers = lipschitz.layer_table(net, sigmas)
        kinds, orders, rhos = [r["kind"] for r in layers], [r["order"] for r in layers], [r["rho"] for r in layers]
    else:  # one group: all parameters; the bound's operations that are not 1-Lipschitz as its rows
        params = [p.detach().double().flatten() for p in model.parameters()]
        kinds, orders = [], [applies.order or 1]
        rhos = [float(torch.cat(params).norm()) if params else 0.0]
        if bound is not None:
            graph_rows = [r for r in bound.table() if r["kind"] in ("conv", "linear") or
                          (math.isfinite(r["factor"]) and r["factor"] != 1.0)]
    order = applies.order if applies.order is not None else math.nan
    return CheckpointStats(name=name, epoch=epoch, kinds=kinds, orders=orders, rhos=rhos, sigmas=sigmas,
                           certifiable=applies.certifiable, splits=splits, kkt=kkt_result, order=order,
                           layerwise=net is model, bound=None if bound is None else bound.total,
                           graph_rows=graph_rows)


# ----------------------------------------------------------------------------- tables

def table1(metrics: pd.DataFrame | None, stats: list[CheckpointStats], loss: str) -> pd.DataFrame:
    """One row per checkpoint from metrics.csv at its epoch, recomputed from the checkpoint otherwise (a
    user's model has no metrics.csv; without a train split its loss and margins are on the test split)."""
    from robustmargin.margins import smoothed_normalized_margin

    by_epoch = (metrics.drop_duplicates("epoch", keep="last").set_index("epoch") if metrics is not None
                else pd.DataFrame())
    rows = []
    for s in stats:
        train, test = s.splits.get("train", s.splits["test"]), s.splits["test"]
        q_min, order = float(train.margins.min()), s.order
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
                         "smoothed_normalized_margin": (smoothed_normalized_margin(train.log_sum_loss, loss,
                                                                                   s.rho ** order)
                                                        if math.isfinite(order) else math.nan),
                         "train_acc": float((train.margins > 0).mean()) if "train" in s.splits else math.nan,
                         "test_acc": float((test.margins > 0).mean()), "source": "checkpoint"})
    return pd.DataFrame(rows)


LIPSCHITZ_COLUMNS = ["checkpoint", "epoch", "layer", "kind", "order", "sigma", "rho", "sigma_over_rho",
                     "sigma_product", "rho_product"]


def lipschitz_table(stats: list[CheckpointStats]) -> pd.DataFrame:
    rows = []
    for s in stats:
        for i, (kind, a, rho) in enumerate(zip(s.kinds, s.orders, s.rhos)):
            sigma = s.sigmas[i]
            rows.append({"checkpoint": s.name, "epoch": s.epoch, "layer": i + 1, "kind": kind, "order": a,
                         "sigma": sigma, "rho": rho, "sigma_over_rho": sigma / rho,
                         "sigma_product": s.sigma_product, "rho_product": s.rho_product})
        for i, r in enumerate(s.graph_rows):  # a user's module: the graph bound's factors
            rows.append({"checkpoint": s.name, "epoch": s.epoch, "layer": i + 1, "kind": r["kind"],
                         "order": math.nan, "sigma": r["factor"], "rho": math.nan, "sigma_over_rho": math.nan,
                         "sigma_product": s.sigma_product, "rho_product": math.nan})
    return pd.DataFrame(rows, columns=LIPSCHITZ_COLUMNS)


def kkt_table(stats: list[CheckpointStats]) -> pd.DataFrame:
    rows = []
    for s in stats:
        k = s.kkt or {}
        train = s.splits.get("train")
        rows.append({"checkpoint": s.name, "epoch": s.epoch,
                     "q_min": float(train.margins.min()) if train is not None else math.nan,
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


def robust_accuracy_table(best: pd.DataFrame | None, epsilons: list[float] | None) -> pd.DataFrame:
    """Robust accuracy per checkpoint, split and ε with its exact 95 % interval over the attacked points:
    at the chosen ε, or else at the quartiles of all distances (source says which)."""
    columns = ["checkpoint", "split", "epsilon", "source", "n", "robust_accuracy", "ci_low", "ci_high"]
    if best is None or best.empty:
        return pd.DataFrame(columns=columns)
    source = "chosen" if epsilons else "quartile"
    grid = list(epsilons) if epsilons else sorted({e for e in pick_epsilons(best).values() if math.isfinite(e)})
    rows = []
    for (checkpoint, split), part in best.groupby(["checkpoint", "split"], sort=False):
        d = part["distance"].to_numpy(float)
        for eps in grid:
            k = int((d > eps).sum())
            low, high = binomial_interval(k, len(d))
            rows.append({"checkpoint": checkpoint, "split": split, "epsilon": eps, "source": source, "n": len(d),
                         "robust_accuracy": k / len(d), "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=columns)


def summary_table(stats: list[CheckpointStats], best: pd.DataFrame | None, points: pd.DataFrame | None
                  ) -> pd.DataFrame:
    """The numbers a reader wants first, per checkpoint and split: clean accuracy, median attack distance
    with a 95 % bootstrap interval, median certified radius, and how many points the attacks disagree on."""
    from robustmargin.stats import bootstrap_interval

    rows = []
    for s in stats:
        for split, st in s.splits.items():
            row = {"checkpoint": s.name, "split": split, "n": len(st.eval_index),
                   "clean_accuracy": float((st.margins[st.eval_index] > 0).mean()),
                   "median_distance": math.nan, "median_low": math.nan, "median_high": math.nan,
                   "median_radius": float(np.median(st.radii)) if st.radii is not None else math.nan,
                   "doubtful": pd.NA}
            part = None if best is None else best[(best["checkpoint"] == s.name) & (best["split"] == split)]
            if part is not None and len(part):
                d = part["distance"].to_numpy(float)
                est, low, high = bootstrap_interval(np.median, d, n_boot=N_BOOT)
                row.update(median_distance=est, median_low=low, median_high=high)
            if points is not None:
                p = points[(points["checkpoint"] == s.name) & (points["split"] == split)]
                if len(p):
                    row["doubtful"] = int((p["spread"].astype(float) > SPREAD_DOUBT).sum())
            rows.append(row)
    return pd.DataFrame(rows).astype({"doubtful": "Int64"})


def margin_vs_robustness(stats: list[CheckpointStats], best: pd.DataFrame | None,
                         epsilons: dict[str, float]) -> pd.DataFrame:
    rows = []
    for s in stats:
        order = s.order
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


def check_epsilons(epsilons) -> list[float]:
    """ε given as numbers or a comma list: finite, non-negative, sorted, no repeats."""
    if isinstance(epsilons, str):
        try:
            epsilons = [float(e) for e in epsilons.split(",") if e.strip()]
        except ValueError:
            raise UserError(f"--eps must be a comma list of numbers, got {epsilons!r}") from None
    values = sorted({float(e) for e in epsilons})
    if not values or not all(math.isfinite(e) and e >= 0 for e in values):
        raise UserError(f"ε must be finite and non-negative numbers, got {list(epsilons)}")
    return values


def analyze_run(run_dir: str | Path | Run, *, device: str = "cpu", kkt_k: int = 100, progress: bool = True,
                write: bool = True, epsilons: list[float] | None = None) -> Analysis:
    """Compute every table of a run and (by default) write them under RUN/tables and RUN/robustness.

    Works the same for a trained run and a user's model: what does not apply to the network is left out
    with a one-line note (tables/notes.txt). Attack results computed on an earlier version of a checkpoint
    file are refused, never used. `epsilons` (else those chosen by `attack --eps`, else the quartiles of the
    distances) are where tables/robust_accuracy.csv gives robust accuracy with intervals."""
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    check_device(device)
    chosen = check_epsilons(epsilons) if epsilons is not None else run.epsilons()
    configure_device(device)  # IEEE float32 on CUDA, as in training
    if kkt_k < 1:
        raise UserError(f"kkt_k must be at least 1, got {kkt_k}")
    metrics = run.metrics()
    index = run.checkpoints()
    results = run.fresh_results()
    inputs = run.inputs(results)
    distances = None if results is None else results.distances
    if distances is not None:
        unknown = sorted(set(distances["checkpoint"]) - set(index["name"]))
        if unknown:
            raise UserError(f"robustness/distances.csv names checkpoints not in the index: {', '.join(unknown)}")
    notes: list[str] = []
    if metrics is not None:
        check_smoothed(metrics)
    data = {s: (x.to(device), y.to(device)) for s, (x, y) in run.data().items() if s in run.splits}
    if distances is not None:
        _check_labels(distances, data)
    if "train" not in data:
        notes.append("table1's loss and margins are on the test split: the data has no training split.")
    stats = []
    x_probe = next(iter(data.values()))[0][:64]
    for row in tqdm(list(index.itertuples(index=False)), desc="analyze", unit="checkpoint", disable=not progress):
        model = run.load_model(row.file).to(device).eval()
        applies = what_applies(model, x_probe)
        if not stats:
            notes += applies.notes
        eval_index = {s: _eval_indices(distances, row.name, s, len(data[s][1])) for s in data}
        stats.append(checkpoint_stats(model, applies, row.name, int(row.epoch), data, eval_index,
                                      loss=run.loss, kkt_k=kkt_k, notes=notes))
    if not run.has_history and any(s.kkt is not None for s in stats):
        notes.append("KKT residuals are on this run's train split, which need not be the model's training set.")

    certified = certified_table(stats)
    if distances is not None and len(certified):
        check_certified(certified, distances)
    best = best_distances(distances) if distances is not None else None
    epsilons = pick_epsilons(best)
    tables = {"table1": table1(metrics, stats, run.loss),
              "lipschitz": lipschitz_table(stats),
              "kkt": kkt_table(stats),
              "margin_vs_robustness": margin_vs_robustness(stats, best, epsilons),
              "margins": margins_table(stats),
              "robust_accuracy": robust_accuracy_table(best, chosen),
              "summary": summary_table(stats, best, None if results is None else results.points)}
    if metrics is not None:
        grid = [e for e in epsilons.values() if math.isfinite(e)]
        tables["claims"] = claims_table(metrics, tables, None if results is None else results.points,
                                        run.companions(), sorted(set(grid)))
        notes += _consistency_notes(tables["table1"], stats)
    if distances is None:
        notes.append("no robustness/distances.csv: the tables have no attack columns; "
                     "run `robustmargin attack` first")
    result = Analysis(tables=tables, certified=certified, warnings=notes)
    if write:
        write_tables(run, result)
        run.write_provenance(inputs)
    return result


def _consistency_notes(t1: pd.DataFrame, stats: list[CheckpointStats]) -> list[str]:
    """metrics.csv and the checkpoint should agree on the margin; say so when they do not."""
    notes = []
    for row, s in zip(t1.itertuples(index=False), stats):
        if row.source != "metrics":
            continue
        recomputed = float(s.splits["train"].margins.min()) / s.rho ** s.order
        if not math.isclose(recomputed, row.normalized_margin, rel_tol=1e-3, abs_tol=1e-12):
            notes.append(f"checkpoint {s.name}: normalized margin {recomputed:.6g} recomputed from the checkpoint "
                         f"differs from metrics.csv ({row.normalized_margin:.6g})")
    return notes


def write_tables(run: Run, result: Analysis) -> None:
    tables_dir = run.path / TABLES
    (run.path / PROVENANCE).unlink(missing_ok=True)  # the tables are incomplete until it is written again
    for name, frame in result.tables.items():
        atomic_write_csv(tables_dir / f"{name}.csv", frame)
        if name in DESCRIPTIONS:  # margins.csv is per-sample data, not a table to read
            atomic_write_text(tables_dir / f"{name}.md", to_markdown(frame, name, describe(name, frame)))
    atomic_write_text(run.path / NOTES, "".join(f"{n}\n" for n in result.warnings))
    atomic_write_csv(run.path / ROBUSTNESS / "certified.csv", result.certified)
