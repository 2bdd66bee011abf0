"""Seaborn figures of a run, drawn from files on disk only (metrics, companions, tables, robustness).

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot, so no GUI backend is
ever touched and nothing global leaks between figures; styles are applied in a context manager.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from robustmargin.fileio import atomic_write

DPI = 110


@contextmanager
def _style() -> Iterator[None]:
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.95):
        yield


def _figure(ncols: int = 1, nrows: int = 1, width: float = 5.2, height: float = 3.8):
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def _log_x_if_wide(ax, x: pd.Series) -> None:
    """Epochs span 1..10^4 in the paper's runs; a log axis keeps the early epochs visible."""
    x = x[x > 0]
    if len(x) and x.max() / x.min() > 100:
        ax.set_xscale("log")


def loss_figure(runs: dict[str, pd.DataFrame]) -> Figure:
    """The paper's Fig. 1: log10 training loss per epoch (and per gradient evaluation) for each schedule."""
    frame = pd.concat([m.assign(run=label) for label, m in runs.items()], ignore_index=True)
    by_evals = "grad_evals" in frame and frame["grad_evals"].notna().any()
    with _style():
        fig, axes = _figure(2 if by_evals else 1)
        panels = [("epoch", "epoch", "per epoch"),
                  ("grad_evals", "gradient evaluations (batches)", "per gradient evaluation")]
        for ax, (x, xlabel, per) in zip(axes, panels):
            sns.lineplot(frame, x=x, y="log10_loss", hue="run", ax=ax, estimator=None)  # linear x, as in Fig. 1
            ax.set(xlabel=xlabel, ylabel=r"$\log_{10}$ training loss", title=f"Training loss {per}")
    return fig


RHO_L = r"$q_{\min}/\rho^L$"
RHO_LAYERWISE = r"$q_{\min}/\Pi_i\,\rho_i^{a_i}$"
SAMPLE_LAYERWISE = r"$q_n/\Pi_i\,\rho_i^{a_i}$"


def _fit_y(ax, rows: pd.DataFrame, columns: list[str]) -> None:
    """Fit the y-axis to the epochs after separation: before it the smoothed margin is hugely negative
    and would flatten the part of the curve the theory is about."""
    values = rows[columns].to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    if len(values) > 1 and values.max() > values.min():
        pad = 0.1 * (values.max() - values.min())
        ax.set_ylim(values.min() - pad, values.max() + pad)


def margin_figure(metrics: pd.DataFrame) -> Figure:
    """γ̄ = q_min/ρ^L with γ̃ (also normalized by ρ^L) beside γ̄' = q_min/∏ρ_i^a_i, per epoch."""
    panels = [("normalized_margin", RHO_L, "Normalized margin"),
              ("normalized_margin_layerwise", RHO_LAYERWISE, "Layer-wise normalized margin")]
    separated = metrics.loc[metrics["train_acc"] >= 1.0, "epoch"]
    with _style():
        fig, axes = _figure(2)
        for ax, (column, label, title) in zip(axes, panels):
            ax.plot(metrics["epoch"], metrics[column], label="normalized margin")
            if column == "normalized_margin":
                ax.plot(metrics["epoch"], metrics["smoothed_normalized_margin"], "--",
                        label="smoothed normalized margin")
            if len(separated):
                ax.axvline(separated.iloc[0], color="grey", lw=0.8, ls=":", label="100 % train accuracy")
                _fit_y(ax, metrics[metrics["epoch"] >= separated.iloc[0]],
                       [column] + (["smoothed_normalized_margin"] if column == "normalized_margin" else []))
            _log_x_if_wide(ax, metrics["epoch"])
            ax.set(xlabel="epoch", ylabel=label, title=title)
            ax.legend(fontsize="small")
    return fig


def accuracy_figure(metrics: pd.DataFrame) -> Figure:
    with _style():
        fig, (ax,) = _figure()
        ax.plot(metrics["epoch"], 100 * metrics["train_acc"], label="train")
        ax.plot(metrics["epoch"], 100 * metrics["test_acc"], label="test")
        _log_x_if_wide(ax, metrics["epoch"])
        ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Clean accuracy")
        ax.legend()
    return fig


def robust_accuracy_figure(curves: pd.DataFrame, order: list[str]) -> Figure:
    """The paper's Fig. 8: robust accuracy against ε for each checkpoint, train and test side by side."""
    splits = [s for s in ("train", "test") if (curves["split"] == s).any()]
    with _style():
        fig, axes = _figure(len(splits))
        for ax, split in zip(axes, splits):
            part = curves[curves["split"] == split]
            present = [n for n in order if (part["checkpoint"] == n).any()]
            sns.lineplot(part, x="epsilon", y="robust_accuracy", hue="checkpoint", hue_order=present, ax=ax,
                         estimator=None)
            ax.set(xlabel="ε (L2)", ylabel="robust accuracy", ylim=(-0.02, 1.02),
                   title=f"Robust accuracy, {split} set")
    return fig


def _accuracy_curve(values: np.ndarray, epsilons: np.ndarray) -> np.ndarray:
    return (values[None, :] > epsilons[:, None]).mean(1)


def certified_figure(certified: pd.DataFrame, best: pd.DataFrame, order: list[str]) -> Figure:
    """Per checkpoint: certified accuracy (r_n > ε, a lower bound) against the attacks' robust accuracy."""
    names = [n for n in order if (best["checkpoint"] == n).any()]
    # Certified radii are often 10-100x below attack distances: a log ε axis shows both curves.
    values = np.concatenate([best["distance"].to_numpy(float), certified["radius"].to_numpy(float)])
    values = values[np.isfinite(values) & (values > 0)]
    low, high = (np.quantile(values, 0.01) / 2, values.max() * 1.5) if len(values) else (1e-3, 1.0)
    epsilons = np.geomspace(low, high, 300)
    ncols = min(len(names), 3)
    with _style():
        fig, axes = _figure(ncols, math.ceil(len(names) / ncols), width=4.2, height=3.3)
        for ax, name in zip(axes, names):
            for split, color in (("train", "C0"), ("test", "C1")):
                d = best[(best["checkpoint"] == name) & (best["split"] == split)]
                r = certified[(certified["checkpoint"] == name) & (certified["split"] == split)]
                if len(d):
                    ax.plot(epsilons, _accuracy_curve(d["distance"].to_numpy(), epsilons), color=color,
                            label=f"{split}: attacks")
                if len(r):
                    ax.plot(epsilons, _accuracy_curve(r["radius"].to_numpy(), epsilons), "--", color=color,
                            label=f"{split}: certified")
            ax.set_xscale("log")
            ax.set(xlabel="ε (L2, log scale)", ylabel="accuracy", ylim=(-0.02, 1.02), title=name)
            ax.legend(fontsize="small")
        for ax in axes[len(names):]:
            ax.set_visible(False)
    return fig


def margin_distribution_figure(margins: pd.DataFrame, order: list[str]) -> Figure | None:
    """ECDF of per-sample layer-wise normalized margins per checkpoint (robust to very different scales); of the
    plain margins q_n where no layer-wise normalization applies (a user's model)."""
    column, label = "normalized_margin_layerwise", SAMPLE_LAYERWISE
    if not np.isfinite(margins[column].to_numpy(float)).any():
        column, label = "margin", r"$q_n$ (logit margin)"
    margins = margins[np.isfinite(margins[column].to_numpy(float))]
    splits = [s for s in ("train", "test") if (margins["split"] == s).any()]
    if not splits:
        return None
    with _style():
        fig, axes = _figure(len(splits))
        for ax, split in zip(axes, splits):
            part = margins[margins["split"] == split]
            present = [n for n in order if (part["checkpoint"] == n).any()]
            sns.ecdfplot(part, x=column, hue="checkpoint", hue_order=present, ax=ax)
            ax.axvline(0, color="grey", lw=0.8)
            ax.xaxis.set_major_locator(MaxNLocator(6))  # margins have long tick labels
            per = part.groupby("checkpoint").size()
            ax.set(xlabel=label, ylabel="cumulative fraction of points",
                   title=f"Margin distribution, {split} set (n = {int(per.max())} per checkpoint)")
    return fig


def kkt_figure(kkt: pd.DataFrame) -> Figure:
    with _style():
        fig, axes = _figure(2)
        for ax, column, label in ((axes[0], "eps", "ε (stationarity)"), (axes[1], "delta", "δ (compl. slackness)")):
            part = kkt[kkt[column] > 0]
            ax.plot(part["checkpoint"], part[column], "o-")
            ax.set_yscale("log")
            ax.set(xlabel="checkpoint", ylabel=label, title=f"KKT residual {label.split(' ')[0]}")
            ax.tick_params(axis="x", rotation=30)
    return fig


def trends_figure(table1: pd.DataFrame, lipschitz: pd.DataFrame, kkt: pd.DataFrame,
                  mvr: pd.DataFrame) -> Figure:
    """Margins, norm products, KKT residuals and attack distances per checkpoint against its log10 loss,
    so a long run shows how each quantity moves over hundreds of decades of loss."""
    loss = table1.set_index("checkpoint")["log10_loss"]
    products = lipschitz.drop_duplicates("checkpoint").set_index("checkpoint")[["sigma_product", "rho_product"]]
    with _style():
        fig, axes = _figure(2, 2, width=5.0, height=3.6)
        ax = axes[0]
        for column, label in (("normalized_margin", RHO_L), ("normalized_margin_layerwise", RHO_LAYERWISE)):
            ax.plot(table1["log10_loss"], table1[column], "o-", label=label)
        if (table1[["normalized_margin", "normalized_margin_layerwise"]] > 0).all().all():
            ax.set_yscale("log")  # the two normalizations differ by orders of magnitude
        ax.set(ylabel="normalized margin", title="Normalized margins")
        ax = axes[1]
        x = loss.reindex(products.index)
        ax.plot(x, products["sigma_product"], "o-", label=r"$\Pi_i\,\sigma_i$ (Lipschitz bound)")
        ax.plot(x, products["rho_product"], "s--", label=r"$\Pi_i\,\rho_i^{a_i}$")
        ax.set_yscale("log")
        ax.set(ylabel="product over layers", title="Lipschitz and norm products")
        ax = axes[2]
        x = loss.reindex(kkt["checkpoint"]).to_numpy()
        for column, label in (("eps", "ε (stationarity)"), ("delta", "δ (compl. slackness)")):
            keep = kkt[column].to_numpy() > 0
            ax.plot(x[keep], kkt[column].to_numpy()[keep], "o-", label=label)
        ax.set_yscale("log")
        ax.set(ylabel="KKT residual", title="KKT residuals")
        ax = axes[3]
        if "median_distance" in mvr:
            for split, part in mvr.dropna(subset=["median_distance"]).groupby("split"):
                ax.plot(loss.reindex(part["checkpoint"]).to_numpy(), part["median_distance"], "o-", label=split)
        ax.set(ylabel="median L2 distance", title="Attack distance (per-sample minimum)")
        for ax in axes:
            ax.set_xlabel("log10 training loss at the checkpoint")
            ax.invert_xaxis()  # training proceeds to the right
            if ax.has_data():
                ax.legend(fontsize=8)
    return fig


def adversarial_figure(examples: list[tuple[str, np.ndarray, np.ndarray, float]]) -> Figure:
    """One row per example (label, original, adversarial, distance): the original, the adversarial, and the
    perturbation amplified to the full colour range."""
    def image(a: np.ndarray) -> np.ndarray:
        return a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))

    with _style():
        fig = Figure(figsize=(7.5, 2.5 * len(examples)), layout="constrained")
        axes = fig.subplots(len(examples), 3, squeeze=False)
        for row, (label, x, adv, distance) in zip(axes, examples):
            delta = adv - x
            scale = float(np.abs(delta).max()) or 1.0
            gray = "gray" if x.shape[0] == 1 else None
            row[0].imshow(image(x), cmap=gray, vmin=0, vmax=1)
            row[1].imshow(image(np.clip(adv, 0, 1)), cmap=gray, vmin=0, vmax=1)
            amplified = image(delta / scale)
            row[2].imshow(amplified if x.shape[0] == 1 else 0.5 + amplified / 2, cmap="RdBu_r" if gray else None,
                          vmin=-1 if gray else 0, vmax=1)
            row[0].set_title(f"{label}: original")
            row[1].set_title(f"adversarial, L2 distance {distance:.3g}")
            row[2].set_title(f"perturbation ×{1 / scale:.3g}")
            for ax in row:
                ax.set_axis_off()
    return fig


def save(fig: Figure, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))


def make_figures(run_dir: str | Path, builders: dict[str, Callable[[], Figure | None]]) -> dict[str, Path]:
    """Draw each figure whose builder returns one and save it as RUN/figures/NAME.png."""
    out = {}
    for name, build in builders.items():
        fig = build()
        if fig is not None:
            out[name] = save(fig, Path(run_dir) / "figures" / f"{name}.png")
    return out
