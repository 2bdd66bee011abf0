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
from pathlib import Path

import pandas as pd

from robustmargin import figures
from robustmargin.analysis import (CLAIMS, best_distances, check_run_dir, describe, read_csv_checked, read_curves,
                                   read_distances, read_metrics, read_points, read_runs)
from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write_text

REQUIRED_TABLES = ("table1", "lipschitz", "kkt", "margin_vs_robustness")
SPREAD_DOUBT = 1.05  # attacks disagreeing by more than 5 % on a point: its distance is the least certain


# ----------------------------------------------------------------------------- reading

def read_tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    folder = run_dir / "tables"
    missing = [n for n in REQUIRED_TABLES if not (folder / f"{n}.csv").is_file()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(n + '.csv' for n in missing)}; "
                        f"run `robustmargin analyze --run {run_dir}` first")
    names = REQUIRED_TABLES + tuple(n for n in ("margins", "claims") if (folder / f"{n}.csv").is_file())
    return {n: read_csv_checked(folder / f"{n}.csv") for n in names}


def attack_doubt(points: pd.DataFrame) -> pd.DataFrame:
    """Per checkpoint and split: points attacked, points where an attack succeeded, and points whose attacks
    disagree by more than 5 % (spread above SPREAD_DOUBT): the distances the curves are least sure of."""
    spread = points["spread"].astype(float)
    frame = points.assign(succeeded=spread.notna(), doubtful=spread > SPREAD_DOUBT)
    out = (frame.groupby(["checkpoint", "split"], sort=False)
           .agg(points=("index", "size"), succeeded=("succeeded", "sum"), spread_above_5pct=("doubtful", "sum"))
           .reset_index())
    out["max_spread"] = frame.groupby(["checkpoint", "split"], sort=False)["spread"].max().to_numpy()
    return out


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
        "trends": lambda: (figures.trends_figure(tables["table1"], tables["lipschitz"], kkt,
                                                 tables["margin_vs_robustness"])
                           if len(tables["table1"]) >= 2 else None),
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
    "trends": "Per checkpoint against its training loss (log10; training proceeds to the right): normalized "
              "margins, the Lipschitz product ∏σ_i and the parameter-norm product ∏ρ_i^a_i, KKT residuals, "
              "and the median attack distance per split (where attacked).",
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
.na { color: #777; font-weight: bold; } .unsure { color: #a05a00; font-weight: bold; }
.warn { background: #fff4d6; border: 1px solid #e0b84c; padding: 0.5em 1em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
.scroll { overflow-x: auto; } .desc { color: #555; font-size: 0.9em; max-width: 60em; }
"""


def table_html(frame: pd.DataFrame, table_id: str) -> str:
    def number(v: float) -> str:
        return "" if isinstance(v, float) and math.isnan(v) else f"{v:.4g}"
    table = frame.to_html(index=False, border=0, na_rep="", float_format=number, table_id=table_id, classes="data")
    return f"<div class='scroll'>{table}</div>"  # wide tables scroll instead of widening the page


VERDICT_CLASS = {"held": "held", "did not hold": "failed", "inconclusive": "unsure", "not measured": "na"}


def _number(v) -> str:
    return "" if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _claims_html(claims: pd.DataFrame) -> str:
    """tables/claims.csv: each claim's statement once, then one line per split and statistic."""
    rows = []
    for claim, part in claims.groupby("claim", sort=False):
        rows.append(f"<tr><th colspan='8'>{html.escape(claim)}: {html.escape(CLAIMS.get(claim, ''))}</th></tr>")
        for r in part.itertuples(index=False):
            ci = "" if _number(r.ci_low) == "" else f"[{_number(r.ci_low)}, {_number(r.ci_high)}]"
            rows.append(f"<tr><td class='{VERDICT_CLASS.get(r.verdict, 'na')}'>{html.escape(str(r.verdict))}</td>"
                        f"<td>{html.escape(str(r.statistic))}</td><td>{_number(r.estimate)}</td><td>{ci}</td>"
                        f"<td>{_number(r.p_value)}</td><td>{_number(r.n)}</td>"
                        f"<td>{html.escape(str(r.detail))}</td></tr>")
    return ("<table class='claims' id='claims'><tr><th>verdict</th><th>statistic</th><th>estimate</th>"
            "<th>interval (Holm level)</th><th>p (Holm-adjusted)</th><th>n</th><th>this run's numbers</th></tr>"
            + "".join(rows) + "</table>")


def _attacks_html(settings: str | None, doubt: pd.DataFrame | None) -> list[str]:
    if settings is None and doubt is None:
        return []
    parts = ["<h2>Attacks</h2>"]
    if settings is not None:
        parts.append(f"<p id='attack-settings'>Settings used: {html.escape(settings)}.</p>")
    if doubt is not None:
        total, above = int(doubt["succeeded"].sum()), int(doubt["spread_above_5pct"].sum())
        parts.append(f"<p class='desc'>{above} of {total} points with a successful attack have a spread (largest "
                     f"over smallest distance among the attacks that succeeded) above 5 %: their distances are "
                     f"the least certain.</p>")
        parts.append(table_html(doubt, "table-spread"))
    return parts


def image_html(name: str, path: Path, caption: str | None = None) -> str:
    """A PNG inlined as base64, so the page is one self-contained file."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    below = "" if caption is None else f"<figcaption>{html.escape(caption)}</figcaption>"
    return f"<figure id='fig-{name}'><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>{below}</figure>"


def render_html(run_dir: Path, config_text: str, claims: pd.DataFrame | None, tables: dict[str, pd.DataFrame],
                figure_paths: dict[str, Path], warnings: list[str], attacks: list[str] = (),
                theory: list[str] = ()) -> str:
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>robustmargin report: "
             f"{html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>",
             f"<h1>robustmargin report</h1><p class='sub'>run <code>{html.escape(str(run_dir))}</code>, "
             f"written {now}</p>"]
    parts += [f"<p class='warn'>{html.escape(w)}</p>" for w in warnings]
    parts += ["<h2>Paper claims</h2>", f"<p class='desc'>{html.escape(describe('claims', claims))}</p>",
              _claims_html(claims)] if claims is not None else []
    parts += list(attacks) + list(theory)
    parts += ["<h2>Tables</h2>"]
    for name in REQUIRED_TABLES:
        parts += [f"<h3>{name}</h3><p class='desc'>{html.escape(describe(name, tables[name]))}</p>",
                  table_html(tables[name], f"table-{name}")]
    parts += ["<h2>Figures</h2>"] + [image_html(n, p, CAPTIONS.get(n, n)) for n, p in figure_paths.items()]
    parts += ["<h2>Configuration</h2>", f"<pre id='config'>{html.escape(config_text)}</pre>", "</body></html>"]
    return "\n".join(parts)


def _theory_html(run_dir: Path) -> list[str]:
    """The theorem checks that `reproduce` ran next to this run (RUN/theory/), if any."""
    path = run_dir / "theory" / "theory.csv"
    if not path.is_file():
        return []
    table = pd.read_csv(path)
    judged = table["passed"].dropna()
    return ["<h2>Theory checks</h2>",
            f"<p class='desc'>Each theorem checked on a small case that meets its assumptions (float64 gradient "
            f"flow): {int((judged.astype(str) == 'True').sum())} of {len(judged)} judged targets met; empty "
            f"<code>passed</code>: reported only. Figures: <code>theory/theory.html</code>.</p>",
            table_html(table, "table-theory")]


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
    claims = None if external else tables.get("claims")
    if claims is None and not external:
        warnings.append(f"tables/claims.csv is missing; rerun `robustmargin analyze --run {run_dir}` for the "
                        f"paper's claims")
    from robustmargin.robustness import describe_settings, read_settings

    settings = read_settings(run_dir)
    points = read_points(run_dir, read_distances(run_dir))
    attacks = _attacks_html(describe_settings(settings) if settings else None,
                            attack_doubt(points) if points is not None and len(points) else None)
    figure_paths = build_figures(run_dir, metrics, tables, runs)
    page = render_html(run_dir, (run_dir / "config.toml").read_text(), claims, tables, figure_paths, warnings,
                       attacks, _theory_html(run_dir))
    return atomic_write_text(run_dir / "report.html", page)
