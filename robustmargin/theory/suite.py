"""`run_theory`: every check, DIR/theory.csv (check, quantity, value, target, passed), DIR/linear.npz
(X, y, w: the linear case's data and final weights, for an independent SVM check) and a self-contained
DIR/theory.html with the figures inlined as base64 PNG."""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from tqdm import tqdm

from robustmargin.fileio import atomic_write, atomic_write_csv, atomic_write_text
from robustmargin.theory import faster, homogeneous, linear

COLUMNS = ["check", "quantity", "value", "target", "passed"]


def _figure(ncols: int):
    fig = Figure(figsize=(5.0 * ncols, 3.6), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False).ravel()


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figures(lin: pd.DataFrame, flows: pd.DataFrame, fast: pd.DataFrame) -> dict[str, Figure]:
    figs = {}
    with sns.axes_style("whitegrid"):
        fig, (a, b) = _figure(2)
        sep = lin[lin["log_t"] > 0]
        sns.lineplot(sep, x="log_t", y="one_minus_cos", hue="loss", ax=a)
        sns.lineplot(sep, x="log_t", y="margin_gap", hue="loss", ax=b)
        a.set(xscale="log", yscale="log", xlabel="log t", ylabel="1 − cos(w, w_svm)", title="Direction → SVM")
        b.set(xscale="log", yscale="log", xlabel="log t", ylabel="γ* − γ̄", title="Normalized-margin gap")
        figs["Linear model: gradient flow approaches the hard-margin SVM"] = fig

        fig, axes = _figure(2)
        for ax, (order, g) in zip(axes, flows.groupby("order")):
            g = g[g["log_loss"] < homogeneous.SEPARATED]
            sns.lineplot(g, x="step", y="smoothed_margin", hue="run", ax=ax, estimator=None)
            ax.set(title=f"Smoothed normalized margin, L = {order}", ylabel="γ̃", xlabel="step (after S < log 2)")
        figs["Theorem 4.1: γ̃ under gradient flow and under SGD"] = fig

        fig, axes = _figure(2)
        flow = flows[flows["run"] == "gradient flow"]
        for order, g in flow.groupby("order"):
            w = g[(g["log_t"] > 1) & (g["log_loss"] < homogeneous.SEPARATED)]
            loglog = np.log(w["log_t"])
            axes[0].plot(loglog, w["log_loss"] + w["log_t"], label=f"L = {order}")
            axes[1].plot(loglog, np.log(w["rho"]), label=f"L = {order}")
        axes[0].set(xlabel="log log t", ylabel="log(S·t)", title="Theorem 4.3: slope −(2 − 2/L)")
        axes[1].set(xlabel="log log t", ylabel="log ρ", title="Theorem 4.3: slope 1/L")
        for ax in axes:
            ax.legend()
        figs["Theorem 4.3: loss and norm rates"] = fig

        fig, axes = _figure(2)
        k = flow.dropna(subset=["kkt_eps"]) if "kkt_eps" in flow else flow.iloc[:0]
        for ax, col, name in ((axes[0], "kkt_eps", "ε"), (axes[1], "kkt_delta", "δ")):
            sns.lineplot(k.assign(L=k["order"].astype(str)), x="log_t", y=col, hue="L", marker="o", ax=ax)
            ax.set(xscale="log", yscale="log", xlabel="log t", ylabel=name, title=f"Theorem 4.4: KKT {name}")
        figs["Theorem 4.4: KKT residuals along the flow"] = fig

        fig, (ax,) = _figure(1)
        sns.lineplot(fast[fast["margin_gap"] > 0], x="step", y="margin_gap", hue="method", ax=ax)
        ax.set(yscale="log", xlabel="iteration", ylabel="γ* − γ̄", title="Margin gap to the SVM (exp loss)")
        figs["Faster margin maximization: GD, normalized GD, PRGD"] = fig
    return figs


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse}"
         "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}.pass{color:#060}.fail{color:#a00}"
         "img{max-width:100%}")


def render(table: pd.DataFrame, figs: dict[str, Figure], seconds: float, quick: bool) -> str:
    rows = []
    for r in table.itertuples(index=False):
        verdict = {True: ("pass", "passed"), False: ("fail", "FAILED")}.get(r.passed, ("", ""))
        rows.append(f"<tr><td>{html.escape(r.check)}</td><td>{html.escape(r.quantity)}</td><td>{r.value:.4g}</td>"
                    f"<td>{html.escape(str(r.target))}</td><td class='{verdict[0]}'>{verdict[1]}</td></tr>")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>robustmargin theory checks"
             f"</title><style>{STYLE}</style></head><body><h1>Theory checks (Lyu &amp; Li, 2020)</h1>",
             f"<p>{'quick' if quick else 'full'} suite, {seconds:.0f} s. Gradient flow in float64, full batch; "
             "see <code>robustmargin/theory</code> for each case and step rule.</p>",
             "<table><tr><th>check</th><th>quantity</th><th>value</th><th>target</th><th>verdict</th></tr>",
             *rows, "</table>"]
    for title, fig in figs.items():
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{_png(fig)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def run_theory(out: str | Path, *, quick: bool, progress: bool = False) -> pd.DataFrame:
    """Run every check; write OUT/theory.csv, OUT/theory.html and OUT/linear.npz; return the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = tqdm(total=6, disable=not progress, unit="check")
    rows, lin_traces = [], []
    x, y = linear.linear_data()
    weights = {}
    for loss in ("logistic", "exp"):
        r, trace, w = linear.run_linear(quick=quick, loss=loss, x=x, y=y)
        rows += r
        lin_traces.append(trace)
        weights[loss] = w
        bar.update(1)
    atomic_write(out / "linear.npz", lambda tmp: np.savez(open(tmp, "wb"), X=x.numpy(), y=y.numpy(),
                                                          w=weights["logistic"], w_exp=weights["exp"]))
    flows = []
    for order in (2, 3):
        flow, sgd = homogeneous.run_flow(order, quick=quick), homogeneous.run_sgd(order, quick=quick)
        rows += homogeneous.monotone_rows(flow, sgd) + homogeneous.rate_rows(flow) + homogeneous.kkt_rows(flow)
        flows += [flow, sgd]
        bar.update(1)
    fast = faster.run_methods(x, y, quick=quick)
    rows += faster.faster_rows(fast)
    bar.update(1)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["value"] = table["value"].astype(float)
    figs = figures(pd.concat(lin_traces, ignore_index=True), pd.concat(flows, ignore_index=True), fast)
    bar.update(1)
    bar.close()
    atomic_write_csv(out / "theory.csv", table)
    atomic_write_text(out / "theory.html", render(table, figs, time.perf_counter() - start, quick))
    return table
