"""RUN/report.html: configuration, tables, figures and the paper's claims checked on this run's numbers.

The report reads the run directory only (it never trains, attacks or analyzes); `robustmargin analyze`
must have written RUN/tables first. The page is self-contained: figures are embedded as base64 PNG
data URIs and the style sheet is inline, so the file can be mailed or archived on its own.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from robustmargin import figures
from robustmargin.analysis import (best_distances, check_run_dir, describe, read_csv_checked, read_curves,
                                   read_distances, read_metrics)
from robustmargin.config import load_config
from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write_text

REQUIRED_TABLES = ("table1", "lipschitz", "kkt", "margin_vs_robustness")
TEST_ACC_TOLERANCE = 0.01   # "barely changes": at most one percentage point between checkpoints
DECADES_FACTOR = 2.0        # "exponentially faster": at least twice the decades of loss at equal cost


@dataclass
class Claim:
    statement: str
    held: bool | None  # None: not measured on this run
    detail: str


# ----------------------------------------------------------------------------- paper claims

def _separation(metrics: pd.DataFrame) -> pd.DataFrame | None:
    """The rows from the first epoch with 100 % training accuracy on, or None if it never came."""
    separated = np.flatnonzero(metrics["train_acc"].to_numpy() >= 1.0)
    return metrics.iloc[separated[0]:] if len(separated) else None


def margin_growth_claim(metrics: pd.DataFrame) -> Claim:
    statement = "The normalized margin grows after the training set is separated."
    after = _separation(metrics)
    if after is None or len(after) < 2:
        return Claim(statement, None, "not measured: the run never kept 100 % training accuracy for two epochs")
    first, last = after.iloc[0], after.iloc[-1]
    held = bool(last["normalized_margin"] > first["normalized_margin"])
    return Claim(statement, held,
                 f"q_min/ρ^L went from {first['normalized_margin']:.4g} at epoch {int(first['epoch'])} (first "
                 f"with 100 % training accuracy) to {last['normalized_margin']:.4g} at epoch {int(last['epoch'])}; "
                 f"layer-wise {first['normalized_margin_layerwise']:.4g} → "
                 f"{last['normalized_margin_layerwise']:.4g}.")


def smoothed_monotone_claim(metrics: pd.DataFrame) -> Claim:
    statement = "The smoothed normalized margin never decreases after separation."
    after = _separation(metrics)
    values = None if after is None else after["smoothed_normalized_margin"].to_numpy(dtype=float)
    values = None if values is None else values[np.isfinite(values)]
    if values is None or len(values) < 2:
        return Claim(statement, None, "not measured: fewer than two separated epochs with a finite smoothed margin")
    prev, cur = values[:-1], values[1:]
    drops = cur < prev
    if not drops.any():
        return Claim(statement, True, f"no decrease over {len(values) - 1} epoch steps after separation "
                                      f"({values[0]:.4g} → {values[-1]:.4g}).")
    largest = float(np.max((prev[drops] - cur[drops]) / np.abs(prev[drops])))
    count = int(drops.sum())
    return Claim(statement, False, f"{count} decrease{'s' * (count != 1)} over {len(values) - 1} epoch steps after "
                                   f"separation; the largest was {largest:.3g} relative "
                                   f"({values[0]:.4g} → {values[-1]:.4g} overall). The theorem covers gradient "
                                   f"flow and small-step gradient descent; SGD steps may dip.")


def _value_at(metrics: pd.DataFrame, column: str, limit: float) -> float:
    """log10 loss of the last row whose `column` is at most `limit`."""
    rows = metrics[metrics[column] <= limit]
    return float(rows["log10_loss"].iloc[-1]) if len(rows) else math.nan


def schedule_claim(runs: dict[str, tuple[str, pd.DataFrame]]) -> Claim:
    """Compare the loss-based run with the constant-LR run at equal epochs and equal gradient evaluations."""
    statement = "Loss-based training decreases the loss exponentially faster than a constant learning rate."
    by_schedule: dict[str, tuple[str, pd.DataFrame]] = {}
    for label, (schedule, metrics) in runs.items():
        by_schedule.setdefault(schedule, (label, metrics))
    if "loss-based" not in by_schedule or "constant" not in by_schedule:
        missing = "constant" if "constant" not in by_schedule else "loss-based"
        return Claim(statement, None, f"not measured: no {missing}-schedule run (add a companion under "
                                      f"RUN/companions/)")
    (_, fast), (_, slow) = by_schedule["loss-based"], by_schedule["constant"]
    parts, ahead = [], []
    for column, what in (("epoch", "epochs"), ("grad_evals", "gradient evaluations")):
        if column not in fast or column not in slow or fast[column].isna().all() or slow[column].isna().all():
            continue
        limit = min(fast[column].max(), slow[column].max())
        lf, ls = _value_at(fast, column, limit), _value_at(slow, column, limit)
        ahead.append(lf <= DECADES_FACTOR * ls if ls < 0 else lf < ls)
        parts.append(f"after {limit:.4g} {what}: loss-based 10^{lf:.1f}, constant 10^{ls:.1f}")
    held = bool(ahead) and all(ahead)
    return Claim(statement, held, "; ".join(parts) + f" (criterion: at least {DECADES_FACTOR:g}× the decades of "
                                                      f"loss at equal epochs and at equal gradient evaluations).")


def robustness_claim(mvr: pd.DataFrame) -> Claim:
    statement = "Robust accuracy rises from the first to the last checkpoint at medium and large ε, train and test."
    columns = ["robust_acc_medium", "robust_acc_large"]
    if not all(c in mvr for c in columns) or mvr[columns].isna().all().all():
        return Claim(statement, None, "not measured: no attack distances (run `robustmargin attack`)")
    parts, rising = [], []
    for split, part in mvr.sort_values("epoch", kind="stable").groupby("split", sort=False):
        if part["checkpoint"].nunique() < 2:
            continue
        first, last = part.iloc[0], part.iloc[-1]
        for size in ("medium", "large"):
            a, b = first[f"robust_acc_{size}"], last[f"robust_acc_{size}"]
            if pd.isna(a) or pd.isna(b):  # this split was not attacked at one of the two checkpoints
                continue
            rising.append(bool(b > a))
            parts.append(f"{split} ε={first[f'eps_{size}']:.3g}: {100 * a:.1f} % → {100 * b:.1f} %")
    if not rising:
        return Claim(statement, None, "not measured: fewer than two attacked checkpoints")
    first_name, last_name = mvr.sort_values("epoch").iloc[[0, -1]]["checkpoint"]
    return Claim(statement, all(rising), f"{first_name} → {last_name}: " + "; ".join(parts) + ".")


def clean_accuracy_claim(t1: pd.DataFrame) -> Claim:
    statement = "Clean test accuracy barely changes across checkpoints."
    acc = t1["test_acc"].dropna()
    if len(acc) < 2:
        return Claim(statement, None, "not measured: fewer than two checkpoints")
    spread = float(acc.max() - acc.min())
    return Claim(statement, spread <= TEST_ACC_TOLERANCE,
                 f"test accuracy ranged {100 * acc.min():.2f} %–{100 * acc.max():.2f} % "
                 f"({100 * spread:.2f} points; tolerance {100 * TEST_ACC_TOLERANCE:g} point) over {len(acc)} "
                 f"checkpoints.")


def paper_claims(metrics: pd.DataFrame, tables: dict[str, pd.DataFrame],
                 runs: dict[str, tuple[str, pd.DataFrame]]) -> list[Claim]:
    return [margin_growth_claim(metrics), smoothed_monotone_claim(metrics), schedule_claim(runs),
            robustness_claim(tables["margin_vs_robustness"]), clean_accuracy_claim(tables["table1"])]


# ----------------------------------------------------------------------------- reading

def read_runs(run_dir: Path, metrics: pd.DataFrame) -> dict[str, tuple[str, pd.DataFrame]]:
    """This run and its companions (RUN/companions/NAME/), keyed by a legend label, with their schedules."""
    schedule = load_config(run_dir / "config.toml").train.schedule
    runs = {f"{schedule} (this run)": (schedule, metrics)}
    folder = run_dir / "companions"
    for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
        if (sub / "config.toml").is_file() and (sub / "metrics.csv").is_file():
            other = load_config(sub / "config.toml").train.schedule
            label = other if sub.name == other else f"{other} ({sub.name})"
            runs[label] = (other, read_metrics(sub))
    return runs


def read_tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    folder = run_dir / "tables"
    missing = [n for n in REQUIRED_TABLES if not (folder / f"{n}.csv").is_file()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(n + '.csv' for n in missing)}; "
                        f"run `robustmargin analyze --run {run_dir}` first")
    names = REQUIRED_TABLES + (("margins",) if (folder / "margins.csv").is_file() else ())
    return {n: read_csv_checked(folder / f"{n}.csv") for n in names}


def stale_inputs(run_dir: Path) -> list[str]:
    """Inputs written after the tables: the report would show an out-of-date analysis."""
    made = (run_dir / "tables" / "table1.csv").stat().st_mtime
    inputs = [run_dir / "metrics.csv", run_dir / "checkpoints" / "index.csv", run_dir / "robustness" / "distances.csv"]
    return [str(p.relative_to(run_dir)) for p in inputs if p.is_file() and p.stat().st_mtime > made]


# ----------------------------------------------------------------------------- figures

def build_figures(run_dir: Path, metrics: pd.DataFrame, tables: dict[str, pd.DataFrame],
                  runs: dict[str, tuple[str, pd.DataFrame]]) -> dict[str, Path]:
    distances, curves = read_distances(run_dir), read_curves(run_dir)
    best = best_distances(distances) if distances is not None else None
    cert_path = run_dir / "robustness" / "certified.csv"
    certified = read_csv_checked(cert_path, ("checkpoint", "split", "index", "radius"), required=False)
    if curves is None and distances is not None:  # no curves.csv: draw them from the distances
        from robustmargin.robustness import curves_frame
        curves = curves_frame(distances)
    kkt = tables["kkt"]
    order = list(tables["table1"].sort_values("epoch", kind="stable")["checkpoint"])  # legends in training order
    builders = {
        "loss": lambda: figures.loss_figure({k: m for k, (_, m) in runs.items()}),
        "margins": lambda: figures.margin_figure(metrics),
        "accuracy": lambda: figures.accuracy_figure(metrics),
        "robust_accuracy": lambda: figures.robust_accuracy_figure(curves, order) if curves is not None else None,
        "certified_vs_attacks": lambda: (figures.certified_figure(certified, best, order)
                                         if certified is not None and best is not None and len(certified) else None),
        "margin_distribution": lambda: (figures.margin_distribution_figure(tables["margins"], order)
                                        if "margins" in tables else None),
        "kkt": lambda: figures.kkt_figure(kkt) if (kkt["eps"] > 0).any() else None,
    }
    if metrics is None:  # an external model has no training history
        builders = {k: v for k, v in builders.items() if k not in TRAINING_FIGURES}
    return figures.make_figures(run_dir, builders)


TRAINING_FIGURES = ("loss", "margins", "accuracy")
EXTERNAL_NOTE = ("External model: the training figures and the paper's claims are left out, since they need a "
                 "training history (metrics.csv).")


CAPTIONS = {
    "loss": "Training loss (log10) per epoch and per gradient evaluation, this run and its companions "
            "(the paper's Fig. 1).",
    "margins": "Normalized margins per epoch (the smoothed one is normalized by ρ^L like the left panel); "
               "the y-axes fit the epochs after the training set is separated (dotted line).",
    "accuracy": "Clean train and test accuracy per epoch.",
    "robust_accuracy": "Robust accuracy against the L2 budget ε per checkpoint (the paper's Fig. 8).",
    "certified_vs_attacks": "Per checkpoint: accuracy certified by the Lipschitz bound (dashed, a lower bound) "
                            "and robust accuracy under the attacks (solid, an upper bound), on a log ε axis.",
    "margin_distribution": "Distribution of per-sample layer-wise normalized margins per checkpoint.",
    "kkt": "KKT residuals of the max-margin problem per checkpoint (both go to 0 at a KKT point).",
}


# ----------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
.claims td, .claims th { text-align: left; vertical-align: top; }
.claims td:nth-child(2) { white-space: nowrap; }
.held { color: #11772d; font-weight: bold; } .failed { color: #b3261e; font-weight: bold; }
.na { color: #777; font-weight: bold; }
.warn { background: #fff4d6; border: 1px solid #e0b84c; padding: 0.5em 1em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
.scroll { overflow-x: auto; } .desc { color: #555; font-size: 0.9em; max-width: 60em; }
"""


def _table_html(frame: pd.DataFrame, table_id: str) -> str:
    def number(v: float) -> str:
        return "" if isinstance(v, float) and math.isnan(v) else f"{v:.4g}"
    table = frame.to_html(index=False, border=0, na_rep="", float_format=number, table_id=table_id, classes="data")
    return f"<div class='scroll'>{table}</div>"  # wide tables scroll instead of widening the page


def _claims_html(claims: list[Claim]) -> str:
    rows = []
    for c in claims:
        verdict, cls = {True: ("held", "held"), False: ("did not hold", "failed"), None: ("not measured", "na")}[c.held]
        rows.append(f"<tr><td>{html.escape(c.statement)}</td><td class='{cls}'>{verdict}</td>"
                    f"<td>{html.escape(c.detail)}</td></tr>")
    return ("<table class='claims' id='claims'><tr><th>claim (Lyu &amp; Li, 2020)</th><th>verdict</th>"
            "<th>this run's numbers</th></tr>" + "".join(rows) + "</table>")


def _image_html(name: str, path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = html.escape(CAPTIONS.get(name, name))
    return (f"<figure id='fig-{name}'><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{caption}</figcaption></figure>")


def render_html(run_dir: Path, config_text: str, claims: list[Claim], tables: dict[str, pd.DataFrame],
                figure_paths: dict[str, Path], warnings: list[str]) -> str:
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>robustmargin report: "
             f"{html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>",
             f"<h1>robustmargin report</h1><p class='sub'>run <code>{html.escape(str(run_dir))}</code>, "
             f"written {now}</p>"]
    parts += [f"<p class='warn'>{html.escape(w)}</p>" for w in warnings]
    parts += ["<h2>Paper claims</h2>", _claims_html(claims)] if claims else []
    parts += ["<h2>Tables</h2>"]
    for name in REQUIRED_TABLES:
        parts += [f"<h3>{name}</h3><p class='desc'>{html.escape(describe(name, tables[name]))}</p>",
                  _table_html(tables[name], f"table-{name}")]
    parts += ["<h2>Figures</h2>"] + [_image_html(n, p) for n, p in figure_paths.items()]
    parts += ["<h2>Configuration</h2>", f"<pre id='config'>{html.escape(config_text)}</pre>", "</body></html>"]
    return "\n".join(parts)


def write_report(run_dir: str | Path) -> Path:
    """Draw RUN/figures/*.png and write RUN/report.html from the files of an analyzed run."""
    from robustmargin.external import is_external, read_notes

    run_dir = check_run_dir(run_dir)
    external = is_external(run_dir)
    metrics = None if external else read_metrics(run_dir)
    tables = read_tables(run_dir)
    runs = {} if external else read_runs(run_dir, metrics)
    warnings = [f"{p} is newer than the tables; rerun `robustmargin analyze` to refresh them"
                for p in stale_inputs(run_dir)]
    warnings += [EXTERNAL_NOTE, *read_notes(run_dir)] if external else []
    claims = [] if external else paper_claims(metrics, tables, runs)
    figure_paths = build_figures(run_dir, metrics, tables, runs)
    page = render_html(run_dir, (run_dir / "config.toml").read_text(), claims, tables, figure_paths, warnings)
    return atomic_write_text(run_dir / "report.html", page)
