"""The analysis module's question asked across runs: does a larger normalized margin go with larger attack
distances? `compare_runs` gathers one row per (run, checkpoint) from each run's own files — tables/table1.csv,
tables/lipschitz.csv, tables/margin_vs_robustness.csv, checkpoints/index.csv, robustness/distances.csv —
and writes OUT/compare.csv and .md, correlations.csv (Spearman ρ between each margin and the median attack
distance over the runs at one loss threshold, with a permutation p-value, a bootstrap interval from 10 runs
on, and a verdict), figures and compare.html.

Margins are those of the training set (the paper's); attack numbers are those of one split (test by
default). Runs of users' models take part on the columns they have (they have no loss threshold, so no
correlation row). Tables that no longer match a run's checkpoints or attack results are refused.
"""
from __future__ import annotations

import datetime as _dt
import html
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write_csv, atomic_write_text
from robustmargin.rundir import Run

MARGINS = ("normalized_margin", "normalized_margin_layerwise", "spectral_margin")
MARGIN_LABELS = {"normalized_margin": r"$q_{\min}/\rho^L$",
                 "normalized_margin_layerwise": r"$q_{\min}/\Pi_i\,\rho_i^{a_i}$",
                 "spectral_margin": r"$q_{\min}/\Pi_i\,\sigma_i$"}
EPSILON_COLUMNS = 5     # robust accuracy columns in compare.csv, at evenly spaced ε above 0
CURVE_POINTS = 41       # ε of the robust-accuracy figure
MIN_RUNS = 3            # a rank correlation over fewer runs says nothing
MIN_BOOT_RUNS = 10      # below this a bootstrap over runs cannot be trusted: permutation p only
ALPHA = 0.05
CORRELATION_COLUMNS = ["threshold_log10", "checkpoint", "margin", "runs", "rho", "low", "high", "p_value", "verdict"]
N_BOOT = 2000

DESCRIPTION = ("One row per run and checkpoint. Margins are on the training set: normalized margin "
               "q_min/ρ^L, layer-wise q_min/∏ρ_i^a_i, spectral q_min/∏σ_i (= the layer-wise margin × "
               "∏ρ_i^a_i/∏σ_i), and sigma_product = ∏σ_i. median_radius (certified), median_distance (best "
               "attack; misclassified points count as 0) and robust_acc_EPS (fraction of points whose best "
               "attack distance exceeds ε) are on the attacked points of the split named in `split`.")
CORRELATION_DESCRIPTION = ("Spearman rank correlation between each margin and the median attack distance, "
                           "over the runs at one loss threshold (the same checkpoint of every run). p_value: "
                           "two-sided permutation test (every ordering of the runs up to 8, 20000 random ones "
                           "above). low/high: percentile bootstrap 95 % interval over runs, only from 10 runs on "
                           "(empty below). verdict on 'larger margin, larger distance': held when p < 0.05 with "
                           "ρ > 0 and the interval (if any) above 0, did not hold likewise below, inconclusive "
                           "otherwise (with 4 runs even ρ = 1 has p = 1/12); each row is its own test, "
                           "not corrected across margins or thresholds; not measured below 3 runs.")


def varying_keys(configs: dict[str, dict[str, Any]]) -> list[str]:
    """The config keys whose values differ between runs (the grid of runs that were not a sweep)."""
    keys = list(dict.fromkeys(k for c in configs.values() for k in c))
    return [k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1]


def run_rows(run: Run, split: str) -> pd.DataFrame:
    """compare.csv's columns for every checkpoint of one analyzed run (robust accuracy aside)."""
    t1 = run.table("table1", ("checkpoint", "epoch", "log10_loss", "normalized_margin",
                              "normalized_margin_layerwise", "train_acc", "test_acc"))
    lip = run.table("lipschitz", ("checkpoint", "sigma_product", "rho_product"))
    mvr = run.table("margin_vs_robustness", ("checkpoint", "split", "median_radius"))
    index = run.checkpoints()
    lip = lip.groupby("checkpoint", as_index=False)[["sigma_product", "rho_product"]].first()
    if lip.empty:  # no traceable chain: no Lipschitz columns
        lip = pd.DataFrame({"checkpoint": t1["checkpoint"], "sigma_product": math.nan, "rho_product": math.nan})
    mvr = mvr[mvr["split"] == split]
    if "median_distance" not in mvr:
        mvr = mvr.assign(median_distance=math.nan)
    rows = (t1.merge(index.rename(columns={"name": "checkpoint"})[["checkpoint", "threshold_log10"]],
                     on="checkpoint", how="left")
            .merge(lip, on="checkpoint", how="left")
            .merge(mvr[["checkpoint", "median_radius", "median_distance"]], on="checkpoint", how="left"))
    rows["spectral_margin"] = rows["normalized_margin_layerwise"] * rows["rho_product"] / rows["sigma_product"]
    rows["split"] = split
    return rows


def best_distances(run: Run, split: str) -> pd.DataFrame | None:
    """Per attacked point of `split`, the smallest distance any attack found."""
    results = run.results()
    if results is None:
        return None
    frame = results.distances
    frame = frame[frame["split"] == split]
    return frame.groupby(["checkpoint", "index"], as_index=False)["distance"].min()


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: Pearson's correlation of the ranks (ties share their mean rank); NaN if one is constant."""
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def correlations(rows: pd.DataFrame, *, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Spearman ρ of each margin against the median attack distance, per loss threshold, over the runs that
    reached it and were attacked there: a permutation p-value always, a bootstrap 95 % interval over runs only
    from MIN_BOOT_RUNS on (resampling a handful of runs repeats them and gives intervals like [1, 1]), and a
    verdict on "larger margin, larger distance": held when p < ALPHA with ρ > 0 (and the interval above 0
    where there is one), did not hold for the same on the negative side, inconclusive otherwise."""
    from robustmargin.stats import (HELD, INCONCLUSIVE, NOT_HELD, bootstrap_interval, interval_verdict,
                                    spearman_permutation_p)

    out = []
    usable = rows[np.isfinite(rows["threshold_log10"]) & np.isfinite(rows["median_distance"])]
    for threshold, group in usable.groupby("threshold_log10", sort=True):
        for margin in MARGINS:
            part = group[np.isfinite(group[margin])]
            row = {"threshold_log10": threshold, "checkpoint": part["checkpoint"].iloc[0] if len(part) else "",
                   "margin": margin, "runs": len(part), "rho": math.nan, "low": math.nan, "high": math.nan,
                   "p_value": math.nan, "verdict": "not measured"}
            if len(part) >= MIN_RUNS:
                x, y = part[margin].to_numpy(), part["median_distance"].to_numpy()
                rho, p = spearman(x, y), spearman_permutation_p(x, y, seed=seed)
                side = INCONCLUSIVE if not p < ALPHA else HELD if rho > 0 else NOT_HELD
                if len(part) >= MIN_BOOT_RUNS:
                    _, low, high = bootstrap_interval(spearman, x, y, n_boot=n_boot, seed=seed)
                    row.update(low=low, high=high)
                    if interval_verdict(low, high) != side:  # test and interval must agree
                        side = INCONCLUSIVE
                row.update(rho=rho, p_value=p, verdict=side)
            out.append(row)
    return pd.DataFrame(out, columns=CORRELATION_COLUMNS)


def gather(runs: Sequence[Path], *, grid: Sequence[str] | None = None, split: str = "test",
           epsilons: Sequence[float] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(compare rows, robust-accuracy curves, notes) of the runs; runs not analyzed, or external, are left
    out with a note. `grid` names the config keys shown per run (default: the keys that differ)."""
    from robustmargin.robustness import default_epsilons, robust_accuracy_curve

    if split not in ("train", "test"):
        raise UserError(f"split must be train or test, got {split!r}")
    notes, kept, configs = [], [], {}
    for path in runs:
        run = Run(path)
        if run.tables_state()[0] == "missing":
            notes.append(f"{run.path.name}: not analyzed (no tables); left out")
        else:
            run.fresh_tables()
            kept.append(run)
            configs[run.path.name] = run.config_values()
    if len({r.path.name for r in kept}) < len(kept):
        raise UserError("two runs share a directory name; compare runs with distinct names")
    if not kept:
        raise UserError("no analyzed runs to compare" + (f" ({'; '.join(notes)})" if notes else ""))
    keys = list(grid) if grid is not None else varying_keys(configs)

    frames, best = [], {}
    for run in kept:
        rows = run_rows(run, split)
        for k in reversed(keys):
            rows.insert(0, k, configs[run.path.name].get(k))
        rows.insert(0, "run", run.path.name)
        frames.append(rows)
        best[run.path.name] = best_distances(run, split)
    rows = pd.concat(frames, ignore_index=True)
    pooled = [b["distance"].to_numpy() for b in best.values() if b is not None and len(b)]
    curves = []
    if pooled:
        pooled_all = np.concatenate(pooled)
        grid_eps = (np.asarray(epsilons, dtype=float) if epsilons is not None
                    else default_epsilons(pooled_all, points=EPSILON_COLUMNS + 1).numpy()[1:])
        fine = default_epsilons(pooled_all, points=CURVE_POINTS).numpy()
        columns = {f"robust_acc_{e:g}": [] for e in grid_eps}
        for row in rows.itertuples(index=False):
            b = best[row.run]
            d = None if b is None else b.loc[b["checkpoint"] == row.checkpoint, "distance"].to_numpy()
            present = d is not None and len(d) > 0
            accs = robust_accuracy_curve(d, grid_eps).numpy() if present else [math.nan] * len(grid_eps)
            for column, acc in zip(columns, accs):
                columns[column].append(float(acc))
            if present:
                curves.append(pd.DataFrame({"run": row.run, "checkpoint": row.checkpoint, "epoch": row.epoch,
                                            "epsilon": fine,
                                            "robust_accuracy": robust_accuracy_curve(d, fine).numpy()}))
        for column, values in columns.items():
            rows[column] = values
    else:
        notes.append("no run has robustness/distances.csv: no attack columns")
    order = ["run", *keys, "checkpoint", "epoch", "threshold_log10", "log10_loss", *MARGINS, "sigma_product",
             "split", "median_radius", "median_distance",
             *[c for c in rows if c.startswith("robust_acc_")], "train_acc", "test_acc"]
    curves_frame = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(
        columns=["run", "checkpoint", "epoch", "epsilon", "robust_accuracy"])
    return rows[order], curves_frame, notes


# --------------------------------------------------------------------------- figures and pages


def margin_figure(rows: pd.DataFrame):
    """Each margin against the median attack distance, one colour per run, checkpoints joined by epoch."""
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    from robustmargin.figures import _figure, _style

    data = rows[np.isfinite(rows["median_distance"])].sort_values(["run", "epoch"])
    if data.empty:
        return None
    with _style():
        fig, axes = _figure(len(MARGINS), width=4.6)
        for i, (ax, margin) in enumerate(zip(axes, MARGINS)):
            sns.lineplot(data, x=margin, y="median_distance", hue="run", sort=False, estimator=None,
                         marker="o", ax=ax, legend=i == len(MARGINS) - 1)
            ax.set(xlabel=MARGIN_LABELS[margin], ylabel="median attack distance (L2)")
            ax.xaxis.set_major_locator(MaxNLocator(4))  # margins carry many digits; keep the ticks apart
        if axes[-1].get_legend() is not None:
            sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
        fig.suptitle("Margin vs median attack distance (training-set margins, attacks on "
                     f"{rows['split'].iloc[0]} points)")
    return fig


def robust_accuracy_figure(curves: pd.DataFrame, rows: pd.DataFrame, keys: Sequence[str]):
    """Robust accuracy against ε at each run's last checkpoint, one panel per grid key, coloured by its
    value (the band spans the runs that share it)."""
    import seaborn as sns

    from robustmargin.figures import _figure, _style

    if curves.empty:
        return None
    last = curves.merge(curves.groupby("run", as_index=False)["epoch"].max(), on=["run", "epoch"])
    values = rows.drop_duplicates("run").set_index("run")
    panels = list(keys) or ["run"]
    with _style():
        fig, axes = _figure(len(panels), width=4.8)
        for ax, key in zip(axes, panels):
            frame = last.assign(value=last["run"].map(values[key]).astype(str)) if key != "run" else \
                last.assign(value=last["run"])
            sns.lineplot(frame, x="epsilon", y="robust_accuracy", hue="value", errorbar=("pi", 100),
                         estimator="median", ax=ax)
            ax.set(xlabel="ε (L2)", ylabel="robust accuracy", ylim=(-0.02, 1.02), title=f"by {key}")
            if ax.get_legend() is not None:
                ax.get_legend().set_title(key)
    return fig


def render_html(title: str, rows: pd.DataFrame, corr: pd.DataFrame, figure_paths: dict[str, Path],
                notes: list[str], sweep_text: str | None) -> str:
    from robustmargin.report import STYLE, image_html, table_html

    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>robustmargin compare: "
             f"{html.escape(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>robustmargin compare</h1><p class='sub'><code>{html.escape(title)}</code>: "
             f"{rows['run'].nunique()} runs, written {now}</p>"]
    parts += [f"<p class='warn'>{html.escape(n)}</p>" for n in notes]
    parts += ["<h2>Correlations</h2>", f"<p class='desc'>{html.escape(CORRELATION_DESCRIPTION)}</p>",
              table_html(corr, "table-correlations"),
              "<h2>Figures</h2>", *[image_html(n, p) for n, p in figure_paths.items()],
              "<h2>Runs</h2>", f"<p class='desc'>{html.escape(DESCRIPTION)}</p>", table_html(rows, "table-compare")]
    if sweep_text is not None:
        parts += ["<h2>Sweep</h2>", f"<pre id='sweep'>{html.escape(sweep_text)}</pre>"]
    return "\n".join(parts + ["</body></html>"])


def compare_runs(runs: Sequence[str | Path], out: str | Path, *, grid: Sequence[str] | None = None,
                 split: str = "test", epsilons: Sequence[float] | None = None, sweep_text: str | None = None,
                 title: str | None = None) -> dict[str, Path]:
    """Write out/compare.csv, compare.md, correlations.csv, curves.csv, figures/*.png and compare.html."""
    from robustmargin.analysis import to_markdown
    from robustmargin.figures import save

    out = Path(out)
    rows, curves, notes = gather([Path(r) for r in runs], grid=grid, split=split, epsilons=epsilons)
    keys = [c for c in rows.columns[1:rows.columns.get_loc("checkpoint")]]
    corr = correlations(rows)
    written = {"compare.csv": atomic_write_csv(out / "compare.csv", rows),
               "correlations.csv": atomic_write_csv(out / "correlations.csv", corr),
               "curves.csv": atomic_write_csv(out / "curves.csv", curves)}
    written["compare.md"] = atomic_write_text(
        out / "compare.md", to_markdown(rows, "Runs compared", DESCRIPTION) + "\n"
        + to_markdown(corr, "Correlations", CORRELATION_DESCRIPTION)
        + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
    figure_paths = {}
    for name, build in (("margin_vs_distance", lambda: margin_figure(rows)),
                        ("robust_accuracy", lambda: robust_accuracy_figure(curves, rows, keys))):
        fig = build()
        if fig is not None:
            figure_paths[name] = save(fig, out / "figures" / f"{name}.png")
    written.update({f"figures/{n}.png": p for n, p in figure_paths.items()})
    written["compare.html"] = atomic_write_text(
        out / "compare.html", render_html(title or str(out), rows, corr, figure_paths, notes, sweep_text))
    return written


def compare_sweep(sweep_dir: str | Path, *, split: str = "test",
                  epsilons: Sequence[float] | None = None) -> dict[str, Path]:
    """compare_runs over a sweep directory's runs, into DIR/compare, with the sweep's grid keys as columns."""
    from robustmargin.status import sweep_runs
    from robustmargin.sweep import SWEEP_FILE, sweep_grid

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / SWEEP_FILE).is_file():
        raise UserError(f"{sweep_dir} is not a sweep directory (no {SWEEP_FILE}); give --runs A B … --out DIR")
    runs = sweep_runs(sweep_dir)
    if not runs:
        raise UserError(f"{sweep_dir} holds no runs yet (runs/*/config.toml)")
    return compare_runs(runs, sweep_dir / "compare", grid=list(sweep_grid(sweep_dir)), split=split,
                        epsilons=epsilons, sweep_text=(sweep_dir / SWEEP_FILE).read_text(encoding="utf-8"),
                        title=str(sweep_dir))
