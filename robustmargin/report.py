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

import numpy as np
import pandas as pd

from robustmargin import figures
from robustmargin.analysis import SPREAD_DOUBT, best_distances, check_epsilons, describe, robust_accuracy_table
from robustmargin.claims import CLAIMS
from robustmargin.fileio import atomic_write_text
from robustmargin.rundir import Results, Run, describe_settings

REQUIRED_TABLES = ("table1", "lipschitz", "kkt", "margin_vs_robustness")
SHOWN_TABLES = ("summary", "robust_accuracy", *REQUIRED_TABLES)
TABLE_TITLES = {"table1": "The paper's Table 1", "summary": "Summary", "robust_accuracy": "Robust accuracy",
                "lipschitz": "Lipschitz bound per layer", "kkt": "KKT residuals",
                "margin_vs_robustness": "Margins against robustness"}


# ----------------------------------------------------------------------------- reading

def read_tables(run: Run) -> dict[str, pd.DataFrame]:
    optional = ("margins", "claims", "summary", "robust_accuracy")
    names = REQUIRED_TABLES + tuple(n for n in optional if (run.path / "tables" / f"{n}.csv").is_file())
    return {n: run.table(n) for n in names}


def _percent(v: float) -> str:
    return f"{100 * v:.1f} %"


def summary_html(run: Run, tables: dict[str, pd.DataFrame], settings: str | None) -> list[str]:
    """The card at the top: for the last checkpoint, per split, clean accuracy, median distance with its
    interval, robust accuracy at the chosen ε, the certified radius where it applies, the attack settings,
    and the points in doubt with the command that tightens them."""
    summary = tables.get("summary")
    if summary is None or summary.empty:
        return []
    last = str(summary["checkpoint"].iloc[-1])
    acc = tables.get("robust_accuracy", pd.DataFrame(columns=["checkpoint"]))
    items = []
    for r in summary[summary["checkpoint"] == last].itertuples(index=False):
        line = f"<b>{html.escape(r.split)}</b> ({r.n} points): clean accuracy {_percent(r.clean_accuracy)}"
        if math.isfinite(r.median_distance):
            line += (f"; median L2 distance {r.median_distance:.4g} [{r.median_low:.4g}, {r.median_high:.4g}]")
        for a in acc[(acc["checkpoint"] == last) & (acc["split"] == r.split)].itertuples(index=False):
            line += (f"; robust accuracy at ε = {a.epsilon:g}{'' if a.source == 'chosen' else ' (quartile)'}: "
                     f"{_percent(a.robust_accuracy)} [{_percent(a.ci_low)}, {_percent(a.ci_high)}]")
        if math.isfinite(r.median_radius):
            line += f"; median certified radius {r.median_radius:.4g}"
        if not pd.isna(r.doubtful) and r.doubtful:
            line += (f"; {int(r.doubtful)} doubtful points (attacks disagree by more than 5 %; tighten them with "
                     f"<code>robustmargin attack --run {html.escape(str(run.path))} --budget strong</code>)")
        items.append(f"<li>{line}</li>")
    where = f"<p>Settings: {html.escape(settings)}.</p>" if settings else "<p>No attack results yet.</p>"
    return [f"<div class='card' id='summary'><h2>Summary: checkpoint {html.escape(last)}</h2><ul>{''.join(items)}"
            f"</ul>{where}<p class='desc'>95 % intervals: bootstrap for the median, exact (Clopper-Pearson) for accuracies.</p>"
            f"</div>"]


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


# ----------------------------------------------------------------------------- figures

def build_figures(run: Run, metrics: pd.DataFrame | None, tables: dict[str, pd.DataFrame],
                  runs: dict[str, tuple[str, pd.DataFrame]], results: Results | None) -> dict[str, Path]:
    from robustmargin.rundir import read_csv

    distances = None if results is None else results.distances
    curves = None if results is None else results.curves
    best = best_distances(distances) if distances is not None else None
    certified = read_csv(run.path / "robustness" / "certified.csv", ("checkpoint", "split", "index", "radius"),
                         required=False)
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
        "adversarials": lambda: adversarial_examples_figure(run, results, order),
    }
    if metrics is None:  # an external model has no training history
        builders = {k: v for k, v in builders.items() if k not in TRAINING_FIGURES}
    return figures.make_figures(run.path, builders)


def adversarial_examples_figure(run: Run, results: Results | None, order: list[str]):
    """Original, adversarial and amplified perturbation for the points of smallest, median and largest
    distance, at the last attacked checkpoint (test split where attacked)."""
    if results is None:
        return None
    points = results.points
    points = points[np.isfinite(points["distance"].astype(float)) & (points["distance"].astype(float) > 0)]
    if points.empty:
        return None
    attacked = [c for c in order if (points["checkpoint"] == c).any()]
    checkpoint = attacked[-1] if attacked else str(points["checkpoint"].iloc[-1])
    part = points[points["checkpoint"] == checkpoint]
    split = "test" if (part["split"] == "test").any() else str(part["split"].iloc[0])
    part = part[part["split"] == split].sort_values("distance", kind="stable")
    found = results.adversarials(checkpoint, split)
    if not found:
        return None
    x = run.split(split)[0]
    chosen = dict.fromkeys([0, len(part) // 2, len(part) - 1])
    examples = []
    for label, k in zip(("smallest", "median", "largest"), chosen):
        r = part.iloc[k]
        if int(r["index"]) in found:
            examples.append((f"{label} (#{int(r['index'])})", x[int(r["index"])].numpy(), found[int(r["index"])],
                             float(r["distance"])))
    return figures.adversarial_figure(examples) if examples else None


def masking_warnings(run: Run) -> list[str]:
    """One line at the top when the decision-based attack beat the gradient attacks on more than a few of
    the points of the masking check (robustness/masking.json)."""
    from robustmargin.robustness import MASKING_SUSPECTS
    from robustmargin.rundir import read_json

    record = read_json(run.path / "robustness" / "masking.json")
    if record is None or len(record.get("suspect", [])) <= MASKING_SUSPECTS:
        return []
    return [f"Possible gradient masking: the decision-based attack foolbox-hsj found distances more than 5 % "
            f"below the gradient attacks' on {len(record['suspect'])} of {len(record['points'])} checked points "
            f"({record['checkpoint']}, {record['split']}); the attack distances may be too large — add "
            f"`--attacks ensemble,foolbox-hsj` to attack with it."]


def figure_counts(results: Results | None, tables: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Captions that say how many points each figure covers."""
    out = {}
    if results is not None:
        per = results.points.groupby(["checkpoint", "split"]).size().groupby("split").max()
        n = ", ".join(f"{split} {k}" for split, k in per.items())
        out["robust_accuracy"] = f"{CAPTIONS['robust_accuracy']} Points per checkpoint: {n}."
        out["adversarials"] = (f"{CAPTIONS['adversarials']} Attacked points per checkpoint: {n}.")
    margins = tables.get("margins")
    if margins is not None and not np.isfinite(margins["normalized_margin_layerwise"].to_numpy(float)).any():
        out["margin_distribution"] = ("Distribution of per-sample logit margins q_n per checkpoint (no layer-wise "
                                      "normalization applies to this model).")
    summary = tables.get("summary")
    if summary is not None and "certified_vs_attacks" in CAPTIONS:
        per = summary.groupby("split")["n"].max()
        out["certified_vs_attacks"] = (f"{CAPTIONS['certified_vs_attacks']} Points per checkpoint: "
                                       f"{', '.join(f'{s} {k}' for s, k in per.items())}.")
    return out


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
    "adversarials": "The best adversarial found for the points of smallest, median and largest attack distance "
                    "(last attacked checkpoint): original, adversarial, and the perturbation amplified to the full "
                    "colour range.",
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
.scroll { overflow-x: auto; max-width: 100%; } .desc { color: #555; font-size: 0.9em; max-width: 60em; }
.card { background: #f3f7fb; border: 1px solid #b8cce0; padding: 0.5em 1.2em; margin: 1em 0; }
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
                theory: list[str] = (), summary: list[str] = (), captions: dict[str, str] | None = None,
                history: bool = True) -> str:
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>robustmargin report: "
             f"{html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>",
             f"<h1>robustmargin report</h1><p class='sub'>run <code>{html.escape(str(run_dir))}</code>, "
             f"written {now}</p>"]
    parts += [f"<p class='warn'>{html.escape(w)}</p>" for w in warnings]
    parts += list(summary)
    parts += ["<h2>Paper claims</h2>", f"<p class='desc'>{html.escape(describe('claims', claims))}</p>",
              _claims_html(claims)] if claims is not None else []
    parts += list(attacks) + list(theory)
    parts += ["<h2>Tables</h2>"]
    left_out = []
    for name in SHOWN_TABLES:
        frame = tables.get(name)
        shown = None if frame is None else frame.dropna(axis=1, how="all")
        if name == "kkt" and shown is not None and "eps" not in shown:
            shown = None  # no residuals: q_min alone is in the other tables
        if shown is None or shown.empty or len(shown.columns) <= 2:  # nothing but checkpoint names
            left_out.append(name)
            continue
        title = TABLE_TITLES[name] if history or name != "table1" else "Margins and accuracy per checkpoint"
        text = describe(name, frame) if history or name != "table1" else describe(name, frame).replace(
            "The paper's Table 1: training", "Per checkpoint:")
        parts += [f"<h3>{html.escape(title)} <small>(tables/{name}.csv)</small></h3>"
                  f"<p class='desc'>{html.escape(text)}</p>", table_html(shown, f"table-{name}")]
    if left_out:
        parts.append(f"<p class='desc'>Left out, empty for this run: {', '.join(left_out)} "
                     f"(tables/notes.txt says why).</p>")
    captions = {**CAPTIONS, **(captions or {})}
    parts += ["<h2>Figures</h2>"] + [image_html(n, p, captions.get(n, n)) for n, p in figure_paths.items()]
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


def write_report(run_dir: str | Path, *, epsilons=None) -> Path:
    """Draw RUN/figures/*.png and write RUN/report.html from the files of an analyzed run. Tables that do not
    belong to the run as it is now (a checkpoint retrained, new attack results) are refused. `epsilons`
    replaces the analysis's ε in the summary and the robust-accuracy table (computed from the results)."""
    run = Run(run_dir)
    metrics = run.metrics()
    run.fresh_tables()
    tables = read_tables(run)
    runs = run.companions()
    warnings = [] if run.has_history else [EXTERNAL_NOTE, *run.notes()]
    warnings = masking_warnings(run) + warnings
    claims = tables.get("claims") if run.has_history else None
    if claims is None and run.has_history:
        warnings.append(f"tables/claims.csv is missing; rerun `robustmargin analyze --run {run.path}` for the "
                        f"paper's claims")
    results = run.results()
    points = None if results is None else results.points
    attacks = _attacks_html(describe_settings(results.settings) if results is not None else None,
                            attack_doubt(points) if points is not None and len(points) else None)
    if epsilons is not None and results is not None:
        tables["robust_accuracy"] = robust_accuracy_table(best_distances(results.distances), check_epsilons(epsilons))
    figure_paths = build_figures(run, metrics, tables, runs, results)
    settings = describe_settings(results.settings) if results is not None else None
    page = render_html(run.path, (run.path / "config.toml").read_text(), claims, tables, figure_paths, warnings,
                       attacks, _theory_html(run.path), summary_html(run, tables, settings),
                       figure_counts(results, tables), run.has_history)
    return atomic_write_text(run.path / "report.html", page)
