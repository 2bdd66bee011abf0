"""The report: paper claims on crafted metrics, a self-contained page from a hand-made analyzed run,
the page rendered by headless Chromium, and the analyze/report commands' errors."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustmargin import analysis, report
from robustmargin.errors import UserError
from robustmargin.cli import main as cli_main
from robustmargin.config import Config
from crafted import crafted_metrics
from robustmargin.rundir import Run, write_index
from tinyrun import write_results



def _mvr(first: float, last: float) -> pd.DataFrame:
    rows = []
    for split in ("train", "test"):
        for name, epoch, acc in (("model-1", 10, first), ("model-2", 20, (first + last) / 2), ("final", 30, last)):
            rows.append({"checkpoint": name, "epoch": epoch, "split": split, "eps_medium": 1.0, "eps_large": 2.0,
                         "robust_acc_medium": acc, "robust_acc_large": acc / 2})
    return pd.DataFrame(rows)


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
    for name in names:  # checkpoint files stand in for trained ones: the report reads only their hashes
        (run / "checkpoints").mkdir(exist_ok=True)
        (run / "checkpoints" / f"{name}.pt").write_bytes(name.encode())
    write_index(run, pd.DataFrame({"name": names, "epoch": [5, 10, 20], "log10_loss": [-10.0, -20.0, -40.0],
                                   "threshold_log10": np.nan, "file": [f"{n}.pt" for n in names], "sha256": ""}))
    write_results(run, pd.DataFrame(rows).assign(attack="ddn"), settings_id="abc123")
    _write(run / "robustness" / "certified.csv", pd.DataFrame(certified))
    _write(run / "robustness" / "curves.csv", pd.DataFrame(curves))
    _write(run / "tables" / "margins.csv", pd.DataFrame(margins))
    points = pd.read_csv(run / "robustness" / "points.csv").astype({"spread": float})
    points.loc[points.index[:3], "spread"] = 1.2  # three points whose attacks disagree by more than 5 %
    _write(run / "robustness" / "points.csv", points)
    settings = json.loads((run / "robustness" / "settings.json").read_text())
    settings["attacks"] = ["ddn", "fmn"]
    (run / "robustness" / "settings.json").write_text(json.dumps(settings))
    write_claims(run)
    r = Run(run)
    r.write_provenance(r.inputs(r.results()))
    return run


def write_claims(run: Path) -> pd.DataFrame:
    """tables/claims.csv from the files of the hand-made run, as `analyze` computes it."""
    tables = {n: pd.read_csv(run / "tables" / f"{n}.csv") for n in ("table1", "margins")}
    r = Run(run)
    results = r.results()
    claims = analysis.claims_table(r.metrics(), tables, None if results is None else results.points,
                                   r.companions(), [1.0, 2.0])
    _write(run / "tables" / "claims.csv", claims)
    return claims


@pytest.fixture(scope="module")
def written_report(tmp_path_factory) -> Path:
    run = make_analyzed_run(tmp_path_factory.mktemp("report"))
    report.write_report(run)
    return run


EXPECTED_FIGURES = {"loss", "margins", "accuracy", "robust_accuracy", "certified_vs_attacks", "margin_distribution",
                    "kkt", "trends"}


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
    claims = pd.read_csv(written_report / "tables" / "claims.csv")
    verdicts = sum(page.count(f"<td class='{c}'>") for c in report.VERDICT_CLASS.values())
    assert verdicts == len(claims)  # one line per claims.csv row


def test_report_claims_on_crafted_run(written_report):
    page = (written_report / "report.html").read_text()
    claims = pd.read_csv(written_report / "tables" / "claims.csv")
    assert "after 20 epochs: loss-based 10^-40.0, constant 10^-5.0" in page
    # the crafted margins grow, the smoothed margin never dips, the constant run is far slower
    assert set(claims[claims["claim"].isin(["C1", "C2", "C3"])]["verdict"]) == {"held"}
    c6 = claims[claims["claim"] == "C6"]
    assert set(c6["detail"].str.split(":").str[0]) == {"train", "test"}
    assert c6["detail"].str.contains("model-1 → final").all()


def test_report_shows_attack_settings_and_spread(written_report):
    page = (written_report / "report.html").read_text()
    assert "attacks ddn + fmn (fast budget" in page and "settings abc123" in page
    assert "3 of 240 points with a successful attack have a spread" in page


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
    claims = pd.read_csv(written_report / "tables" / "claims.csv")
    assert tables["claims"] == 1 + claims["claim"].nunique() + len(claims)  # header, one per claim, rows
    assert tables["table-table1"] == 4  # header + rows


def test_report_without_robustness(tmp_path):
    run = make_analyzed_run(tmp_path)
    shutil.rmtree(run / "robustness")
    shutil.rmtree(run / "companions")
    mvr = pd.read_csv(run / "tables" / "margin_vs_robustness.csv")
    mvr.drop(columns=[c for c in mvr if "eps" in c or "robust" in c]).to_csv(
        run / "tables" / "margin_vs_robustness.csv", index=False)
    write_claims(run)
    _write(run / "robustness" / "certified.csv", pd.DataFrame(columns=["checkpoint", "split", "index", "radius"]))
    r = Run(run)
    r.write_provenance(r.inputs(None))
    report.write_report(run)
    page = (run / "report.html").read_text()
    assert page.count("<td class='na'>") == 2  # schedule comparison and robustness: not measured
    assert "<h2>Attacks</h2>" not in page
    assert {p.stem for p in (run / "figures").glob("*.png")} == EXPECTED_FIGURES - {"robust_accuracy",
                                                                                   "certified_vs_attacks"}


def test_report_refuses_tables_of_an_earlier_checkpoint(tmp_path):
    run = make_analyzed_run(tmp_path)
    report.write_report(run)
    (run / "checkpoints" / "final.pt").write_bytes(b"trained further")
    with pytest.raises(UserError, match=r"stale .*checkpoint final.*robustmargin analyze --run"):
        report.write_report(run)


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
