"""compare: every number of compare.csv recomputed from each run's own files; Spearman against scipy."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from robustmargin.cli.main import main
from robustmargin.compare import correlations, spearman
from robustmargin.stats import spearman_permutation_p
from tinysweep import NAMES


@pytest.fixture(scope="module")
def compared(swept, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    shutil.copytree(swept / "out", out, symlinks=True)
    assert main(["compare", str(out)]) == 0
    return out


def test_compare_numbers_come_from_each_runs_own_files(compared):
    rows = pd.read_csv(compared / "compare" / "compare.csv")
    assert sorted(rows["run"]) == NAMES and (rows["checkpoint"] == "final").all() and (rows["split"] == "test").all()
    eps_columns = [c for c in rows if c.startswith("robust_acc_")]
    assert len(eps_columns) == 5
    for row in rows.to_dict("records"):
        run = compared / "runs" / row["run"]
        seed, width = (float(part.split("=")[1]) for part in row["run"].split(","))
        assert (row["train.seed"], row["model.width"]) == (seed, width)
        t1 = pd.read_csv(run / "tables" / "table1.csv").set_index("checkpoint").loc["final"]
        for column in ("epoch", "log10_loss", "normalized_margin", "normalized_margin_layerwise",
                       "train_acc", "test_acc"):
            assert row[column] == pytest.approx(t1[column], rel=1e-12), column
        sigma = pd.read_csv(run / "tables" / "lipschitz.csv")["sigma"].to_numpy()
        assert row["sigma_product"] == pytest.approx(np.prod(sigma), rel=1e-9)
        margins = pd.read_csv(run / "tables" / "margins.csv")
        q_min = margins.loc[margins["split"] == "train", "margin"].min()   # every training point (n_train 100)
        assert row["spectral_margin"] == pytest.approx(q_min / np.prod(sigma), rel=1e-4)
        certified = pd.read_csv(run / "robustness" / "certified.csv")
        assert row["median_radius"] == pytest.approx(np.median(certified.loc[certified["split"] == "test", "radius"]))
        d = pd.read_csv(run / "robustness" / "distances.csv")
        best = d[d["split"] == "test"].pivot_table(index="index", columns="attack", values="distance").min(axis=1)
        assert len(best) == 10 and row["median_distance"] == pytest.approx(np.median(best))
        for column in eps_columns:
            assert row[column] == pytest.approx(np.mean(best.to_numpy() > float(column.split("_")[-1])))


def test_compare_page_and_files(compared):
    folder = compared / "compare"
    page = (folder / "compare.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "src='figures" not in page
    assert all((folder / "figures" / f"{n}.png").stat().st_size > 1000 for n in ("margin_vs_distance", "robust_accuracy"))
    assert "| run | train.seed | model.width | checkpoint |" in (folder / "compare.md").read_text()
    curves = pd.read_csv(folder / "curves.csv")
    assert set(curves["run"]) == set(NAMES) and curves["robust_accuracy"].between(0, 1).all()
    assert list(pd.read_csv(folder / "correlations.csv").columns) == [
        "threshold_log10", "checkpoint", "margin", "runs", "rho", "low", "high", "p_value", "verdict"]


def test_compare_listed_runs_shows_what_differs(compared, tmp_path, capsys):
    runs = [compared / "runs" / NAMES[0], compared / "runs" / NAMES[3]]
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.toml").write_text((runs[0] / "config.toml").read_text())
    assert main(["compare", "--runs", *map(str, runs), str(tmp_path / "bare"), "--out", str(tmp_path / "c")]) == 0
    rows = pd.read_csv(tmp_path / "c" / "compare.csv")
    assert list(rows.columns[:4]) == ["run", "model.width", "train.seed", "checkpoint"]
    assert "bare: not analyzed" in (tmp_path / "c" / "compare.md").read_text()
    capsys.readouterr()
    assert main(["compare", "--runs", str(runs[0])]) == 2
    assert "--runs needs --out" in capsys.readouterr().err
    assert main(["compare", str(runs[0])]) == 2
    assert "is not a sweep directory" in capsys.readouterr().err


def test_spearman_and_its_interval_against_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=12)
    y = x + rng.normal(scale=0.8, size=12)
    y[3] = y[5]  # a tie
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, rel=1e-12)
    rows = pd.DataFrame({"run": [f"r{i}" for i in range(12)] * 2, "checkpoint": ["a"] * 12 + ["b"] * 12,
                         "threshold_log10": [-10.0] * 12 + [-20.0] * 12,
                         "normalized_margin": np.r_[x, x], "normalized_margin_layerwise": np.r_[x, -x],
                         "spectral_margin": np.r_[x, x[:2], [np.nan] * 10],
                         "median_distance": np.r_[y, y]})
    corr = correlations(rows, n_boot=500).set_index(["threshold_log10", "margin"])
    rho = stats.spearmanr(x, y).statistic
    for threshold in (-10.0, -20.0):
        got = corr.loc[(threshold, "normalized_margin")]
        assert got["rho"] == pytest.approx(rho) and got["low"] < rho < got["high"] and got["runs"] == 12
        # ρ = 0.54 over 12 runs: the permutation p (0.074, scipy's t approximation 0.073) is not significant
        assert got["p_value"] == pytest.approx(spearman_permutation_p(x, y))
        assert got["p_value"] == pytest.approx(stats.spearmanr(x, y).pvalue, abs=0.01)
        assert got["verdict"] == "inconclusive"
    assert corr.loc[(-20.0, "normalized_margin_layerwise"), "rho"] == pytest.approx(-rho)
    few = corr.loc[(-20.0, "spectral_margin")]
    assert few["runs"] == 2 and np.isnan(few["rho"])   # fewer than 3 runs: no correlation claimed
    assert few["verdict"] == "not measured" and np.isnan(few["p_value"])


def _runs(margin: np.ndarray, distance: np.ndarray) -> pd.DataFrame:
    n = len(margin)
    return pd.DataFrame({"run": [f"r{i}" for i in range(n)], "checkpoint": "final", "threshold_log10": -10.0,
                         "normalized_margin": margin, "normalized_margin_layerwise": margin,
                         "spectral_margin": -margin, "median_distance": distance})


def test_few_runs_in_perfect_order_are_inconclusive_not_certain():
    # 4 runs with ρ = 1: a bootstrap over runs gave [1, 1]; only 2 of the 24 orderings reach |ρ| = 1
    corr = correlations(_runs(np.arange(4.0), np.array([0.1, 0.5, 0.7, 2.0]))).set_index("margin")
    got = corr.loc["normalized_margin"]
    assert got["rho"] == pytest.approx(1.0) and got["p_value"] == pytest.approx(2 / 24)
    assert np.isnan(got["low"]) and np.isnan(got["high"]) and got["verdict"] == "inconclusive"
    # 6 runs in order: p = 2/720, firm both ways, still with no interval
    corr = correlations(_runs(np.arange(6.0), np.arange(6.0) ** 2)).set_index("margin")
    assert corr.loc["normalized_margin", "p_value"] == pytest.approx(2 / 720)
    assert corr.loc["normalized_margin", "verdict"] == "held"
    assert corr.loc["spectral_margin", "verdict"] == "did not hold"
    assert corr["low"].isna().all()
    # from 10 runs on the bootstrap interval is given, and must agree with the test
    corr = correlations(_runs(np.arange(12.0), np.arange(12.0) ** 2), n_boot=500).set_index("margin")
    assert corr.loc["normalized_margin", "low"] > 0 and corr.loc["normalized_margin", "verdict"] == "held"
    assert corr.loc["spectral_margin", "high"] < 0 and corr.loc["spectral_margin", "verdict"] == "did not hold"
