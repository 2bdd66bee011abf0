"""The report: paper claims on crafted metrics, a self-contained page from a hand-made analyzed run,
the page rendered by headless Chromium, and the analyze/report commands' errors."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustmargin import report
from robustmargin.cli import main as cli_main
from robustmargin.config import Config

EPOCHS = np.arange(0, 21)


def crafted_metrics(*, separate_at: int = 5, margin_slope: float = 0.01, dips: tuple[int, ...] = (),
                    loss_per_epoch: float = -2.0, evals_per_epoch: int = 3) -> pd.DataFrame:
    """Metrics whose claims hold or fail as constructed: margins grow linearly after `separate_at`, the
    smoothed margin sits just below and dips by 1 % at the epochs in `dips`."""
    margin = -0.05 + margin_slope * EPOCHS
    smoothed = margin - 0.001
    for e in dips:
        smoothed[e] = smoothed[e - 1] * 0.99
    return pd.DataFrame({
        "epoch": EPOCHS, "log10_loss": loss_per_epoch * EPOCHS, "train_acc": np.where(EPOCHS >= separate_at, 1.0, 0.9),
        "test_acc": 0.95, "normalized_margin": margin, "normalized_margin_layerwise": 10 * margin,
        "smoothed_normalized_margin": smoothed, "grad_evals": evals_per_epoch * EPOCHS})


def test_margin_growth_claim():
    assert report.margin_growth_claim(crafted_metrics()).held is True
    shrinking = report.margin_growth_claim(crafted_metrics(margin_slope=-0.01, separate_at=0))
    assert shrinking.held is False and "epoch 0" in shrinking.detail and "epoch 20" in shrinking.detail
    never = crafted_metrics(separate_at=99)
    assert report.margin_growth_claim(never).held is None
    assert report.smoothed_monotone_claim(never).held is None


def test_smoothed_monotone_claim_counts_decreases():
    assert report.smoothed_monotone_claim(crafted_metrics()).held is True
    claim = report.smoothed_monotone_claim(crafted_metrics(dips=(8, 12)))
    assert claim.held is False
    assert claim.detail.startswith("2 decreases over 15 epoch steps")
    assert "0.01 relative" in claim.detail
    # a dip before separation does not count
    assert report.smoothed_monotone_claim(crafted_metrics(dips=(3,))).held is True


def test_schedule_claim():
    fast, slow = crafted_metrics(loss_per_epoch=-2.0, evals_per_epoch=3), crafted_metrics(loss_per_epoch=-0.25,
                                                                                         evals_per_epoch=1)
    claim = report.schedule_claim({"a": ("loss-based", fast), "b": ("constant", slow)})
    assert claim.held is True
    # at 20 gradient evaluations the loss-based run is at epoch 6 (10^-12), the constant one at 10^-5
    assert "after 20 epochs: loss-based 10^-40.0, constant 10^-5.0" in claim.detail
    assert "after 20 gradient evaluations: loss-based 10^-12.0, constant 10^-5.0" in claim.detail
    close = crafted_metrics(loss_per_epoch=-0.4, evals_per_epoch=1)
    assert report.schedule_claim({"a": ("loss-based", close), "b": ("constant", slow)}).held is False
    absent = report.schedule_claim({"a": ("loss-based", fast)})
    assert absent.held is None and absent.detail.startswith("not measured")


def _mvr(first: float, last: float) -> pd.DataFrame:
    rows = []
    for split in ("train", "test"):
        for name, epoch, acc in (("model-1", 10, first), ("model-2", 20, (first + last) / 2), ("final", 30, last)):
            rows.append({"checkpoint": name, "epoch": epoch, "split": split, "eps_medium": 1.0, "eps_large": 2.0,
                         "robust_acc_medium": acc, "robust_acc_large": acc / 2})
    return pd.DataFrame(rows)


def test_robustness_and_accuracy_claims():
    assert report.robustness_claim(_mvr(0.3, 0.6)).held is True
    falling = report.robustness_claim(_mvr(0.6, 0.3))
    assert falling.held is False and "model-1 → final" in falling.detail and "60.0 % → 30.0 %" in falling.detail
    assert report.robustness_claim(pd.DataFrame({"checkpoint": ["a"], "epoch": [1], "split": ["train"]})).held is None
    t1 = pd.DataFrame({"test_acc": [0.991, 0.993, 0.992]})
    ok = report.clean_accuracy_claim(t1)
    assert ok.held is True and "0.20 points" in ok.detail
    assert report.clean_accuracy_claim(pd.DataFrame({"test_acc": [0.90, 0.95]})).held is False


# ----------------------------------------------------------------------------- a hand-made analyzed run

def _write(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


def make_analyzed_run(root: Path) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "config.toml").write_text(Config().to_toml())
    _write(run / "metrics.csv", crafted_metrics())
    companion = run / "companions" / "constant"
    companion.mkdir(parents=True)
    cfg = Config()
    cfg.train.schedule = "constant"
    (companion / "config.toml").write_text(cfg.to_toml())
    _write(companion / "metrics.csv", crafted_metrics(loss_per_epoch=-0.25, evals_per_epoch=1))
    names = ["model-1", "model-2", "final"]
    _write(run / "tables" / "table1.csv", pd.DataFrame({
        "checkpoint": names, "epoch": [5, 10, 20], "log10_loss": [-10.0, -20.0, -40.0],
        "normalized_margin": [0.0, 0.05, 0.15], "normalized_margin_layerwise": [0.0, 0.5, 1.5],
        "smoothed_normalized_margin": [-0.001, 0.049, 0.149], "train_acc": 1.0, "test_acc": [0.95, 0.951, 0.952],
        "source": "metrics"}))
    _write(run / "tables" / "lipschitz.csv", pd.DataFrame({
        "checkpoint": np.repeat(names, 2), "epoch": np.repeat([5, 10, 20], 2), "layer": [1, 2] * 3,
        "kind": "linear", "order": 1, "sigma": 2.0, "rho": 3.0, "sigma_over_rho": 2 / 3, "sigma_product": 4.0,
        "rho_product": 9.0}))
    _write(run / "tables" / "kkt.csv", pd.DataFrame({"checkpoint": names, "epoch": [5, 10, 20],
                                                    "q_min": [0.1, 1.0, 5.0], "eps": [0.5, 0.2, 0.05],
                                                    "delta": [0.3, 0.1, 0.01], "k": 100}))
    mvr = _mvr(0.3, 0.6)
    mvr["epoch"] = np.tile([5, 10, 20], 2)
    _write(run / "tables" / "margin_vs_robustness.csv", mvr)
    rng = np.random.default_rng(0)
    rows, certified, margins, curves = [], [], [], []
    for k, name in enumerate(names):
        for split in ("train", "test"):
            d = rng.exponential(1.0 + k, 40)
            rows += [{"checkpoint": name, "split": split, "index": i, "label": i % 10, "correct": 1, "attack": "cw",
                      "distance": v} for i, v in enumerate(d)]
            certified += [{"checkpoint": name, "split": split, "index": i, "radius": v / 5} for i, v in enumerate(d)]
            margins += [{"checkpoint": name, "epoch": 5 * (k + 1), "split": split, "index": i, "margin": v,
                         "normalized_margin_layerwise": v / 10} for i, v in enumerate(rng.normal(k + 1, 0.5, 40))]
            curves += [{"checkpoint": name, "split": split, "epsilon": e, "robust_accuracy": float((d > e).mean())}
                       for e in np.linspace(0, 4, 21)]
    _write(run / "robustness" / "distances.csv", pd.DataFrame(rows))
    _write(run / "robustness" / "certified.csv", pd.DataFrame(certified))
    _write(run / "robustness" / "curves.csv", pd.DataFrame(curves))
    _write(run / "tables" / "margins.csv", pd.DataFrame(margins))
    return run


@pytest.fixture(scope="module")
def written_report(tmp_path_factory) -> Path:
    run = make_analyzed_run(tmp_path_factory.mktemp("report"))
    report.write_report(run)
    return run


EXPECTED_FIGURES = {"loss", "margins", "accuracy", "robust_accuracy", "certified_vs_attacks", "margin_distribution",
                    "kkt"}


def test_report_is_self_contained(written_report):
    page = (written_report / "report.html").read_text()
    assert {p.stem for p in (written_report / "figures").glob("*.png")} == EXPECTED_FIGURES
    sources = re.findall(r"""\s(?:src|href)\s*=\s*['"]([^'"]*)""", page, flags=re.I)
    assert len(sources) == len(EXPECTED_FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<link|<script|@import|url\(", page, flags=re.I)
    assert "http://" not in page and "https://" not in page
    for table in ("claims", "table-table1", "table-lipschitz", "table-kkt", "table-margin_vs_robustness"):
        assert f'id="{table}"' in page or f"id='{table}'" in page
    assert "schedule = &quot;loss-based&quot;" in page  # the configuration, escaped
    assert page.count("class='held'") == 5  # every claim holds on the crafted run


def test_report_claims_on_crafted_run(written_report):
    page = (written_report / "report.html").read_text()
    assert "after 20 epochs: loss-based 10^-40.0, constant 10^-5.0" in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


PROBE = """<script>window.addEventListener("load", () => {
  const probe = document.createElement("pre"); probe.id = "probe";
  probe.textContent = JSON.stringify({
    images: [...document.images].map(i => [i.alt, i.complete, i.naturalWidth]),
    tables: [...document.querySelectorAll("table")].map(t => [t.id, t.rows.length])});
  document.body.appendChild(probe);
});</script>"""


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(written_report, tmp_path):
    # A copy with a probe script that records, after load, what the browser made of each image and table;
    # network is mapped to nowhere so anything not embedded could not load.
    page = (written_report / "report.html").read_text().replace("</body>", PROBE + "</body>")
    probed = tmp_path / "probed.html"
    probed.write_text(page)
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tempfile.mkdtemp()}", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', out, flags=re.S)
    assert found, f"chromium produced no probe output: {out[-500:]}"
    probe = json.loads(html.unescape(found.group(1)))
    images = {alt: (complete, width) for alt, complete, width in probe["images"]}
    assert set(images) == EXPECTED_FIGURES
    assert all(complete and width > 0 for complete, width in images.values()), images
    tables = dict(probe["tables"])
    assert {"claims", "table-table1", "table-lipschitz", "table-kkt", "table-margin_vs_robustness"} <= set(tables)
    assert tables["claims"] == 6 and tables["table-table1"] == 4  # header + rows


def test_report_without_robustness(tmp_path):
    run = make_analyzed_run(tmp_path)
    shutil.rmtree(run / "robustness")
    shutil.rmtree(run / "companions")
    mvr = pd.read_csv(run / "tables" / "margin_vs_robustness.csv")
    mvr.drop(columns=[c for c in mvr if "eps" in c or "robust" in c]).to_csv(
        run / "tables" / "margin_vs_robustness.csv", index=False)
    report.write_report(run)
    page = (run / "report.html").read_text()
    assert page.count("class='na'") == 2  # schedule comparison and robustness: not measured
    assert {p.stem for p in (run / "figures").glob("*.png")} == EXPECTED_FIGURES - {"robust_accuracy",
                                                                                   "certified_vs_attacks"}


def test_report_draws_curves_from_distances(tmp_path):
    run = make_analyzed_run(tmp_path)
    (run / "robustness" / "curves.csv").unlink()
    report.write_report(run)
    assert (run / "figures" / "robust_accuracy.png").is_file()


def test_report_warns_when_tables_are_stale(tmp_path):
    run = make_analyzed_run(tmp_path)
    table1 = run / "tables" / "table1.csv"
    os.utime(table1, (1, 1))
    report.write_report(run)
    assert "robustness/distances.csv is newer than the tables" in (run / "report.html").read_text()


# ----------------------------------------------------------------------------- command line

def _cli(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(cli_main, "COMMANDS", ("analyze", "report"))  # only this module's commands
    code = cli_main.main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_cli_missing_run_dir(monkeypatch, capsys, tmp_path, command):
    code, err = _cli(monkeypatch, capsys, command, "--run", str(tmp_path / "nope"))
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_cli_missing_metrics(monkeypatch, capsys, tmp_path, command):
    (tmp_path / "config.toml").write_text(Config().to_toml())
    code, err = _cli(monkeypatch, capsys, command, "--run", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "metrics.csv" in err


def test_cli_report_needs_analyze(monkeypatch, capsys, tmp_path):
    run = make_analyzed_run(tmp_path)
    shutil.rmtree(run / "tables")
    code, err = _cli(monkeypatch, capsys, "report", "--run", str(run))
    assert code == 2 and err.count("\n") == 1 and "robustmargin analyze --run" in err


def test_cli_report_writes(monkeypatch, capsys, tmp_path):
    run = make_analyzed_run(tmp_path)
    monkeypatch.setattr(cli_main, "COMMANDS", ("analyze", "report"))
    assert cli_main.main(["report", "--run", str(run), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert (run / "report.html").is_file()


def test_cli_bad_config(monkeypatch, capsys, tmp_path):
    (tmp_path / "config.toml").write_text("[train]\nnot_a_key = 1\n")
    (tmp_path / "metrics.csv").write_text("epoch\n0\n")
    code, err = _cli(monkeypatch, capsys, "analyze", "--run", str(tmp_path))
    assert code == 2 and err.count("\n") == 1


def test_cli_analyze_bad_device(monkeypatch, capsys, tmp_path):
    (tmp_path / "config.toml").write_text(Config().to_toml())
    code, err = _cli(monkeypatch, capsys, "analyze", "--run", str(tmp_path), "--device", "tpu9")
    assert code == 2 and err.count("\n") == 1 and "device" in err
