"""`robustmargin reproduce`: every stage end to end on a tiny run, rerun resumes, bad input."""
from __future__ import annotations

import importlib

import pandas as pd
import pytest

from robustmargin.cli.main import main

THEORY_CALLS: list[str] = []


def fake_theory(out, *, quick, progress):
    """Stands in for the quick theorem checks (tests/test_theory.py runs the real ones)."""
    THEORY_CALLS.append(str(out))
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"check": ["linear-svm"], "quantity": ["1 - cos"], "value": [3e-7], "target": ["<= 1e-3"],
                          "passed": [True]})
    table.to_csv(out / "theory.csv", index=False)
    return table

TINY = """
[data]
n_train = 100
n_test = 50

[model]
name = "mlp"
hidden = [32]

[train]
schedule = "normalized"
batch_size = 25
epochs = 12
thresholds = [-0.5, -1.0]
"""


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reproduce")
    (folder / "tiny.toml").write_text(TINY)
    out = folder / "run"
    argv = ["reproduce", "--config", str(folder / "tiny.toml"), "--out", str(out), "--n", "10",
            "--companions", "constant", "--companion-seconds", "2", "--quiet"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.import_module("robustmargin.reproduce"), "run_theory", fake_theory)
        assert main(argv) == 0
        yield out, argv


def test_every_stage_wrote_its_files(reproduced):
    out, _ = reproduced
    metrics = pd.read_csv(out / "metrics.csv")
    index = pd.read_csv(out / "checkpoints" / "index.csv")
    assert len(metrics) == 13 and list(index["name"])[-1] == "final"
    distances = pd.read_csv(out / "robustness" / "distances.csv")
    attacks = distances["attack"].nunique()
    ends = {index.sort_values("epoch")["name"].iloc[0], "final"}  # the pair the robustness claim compares
    assert len(index) > 2 and set(distances["checkpoint"]) == ends
    assert len(distances) == 2 * 2 * 10 * attacks  # checkpoints × splits × points × attacks
    curves = pd.read_csv(out / "robustness" / "curves.csv")
    assert (curves.groupby(["checkpoint", "split"])["robust_accuracy"].apply(
        lambda a: a.is_monotonic_decreasing)).all()
    table1 = pd.read_csv(out / "tables" / "table1.csv")
    assert list(table1["checkpoint"]) == list(index["name"])
    companion = pd.read_csv(out / "companions" / "constant" / "metrics.csv")
    assert len(companion) >= 2 and (companion["rollbacks"] == 0).all()
    page = (out / "report.html").read_text()
    assert "constant" in page and page.count("<img") >= 3
    assert THEORY_CALLS == [str(out / "theory")]
    assert "Theory checks" in page and "1 of 1 judged targets met" in page and "linear-svm" in page


def test_rerun_resumes_without_redoing(reproduced):
    out, argv = reproduced
    before = {p: p.stat().st_mtime_ns for p in (out / "robustness" / "parts").rglob("*") if p.is_file()}
    metrics = (out / "metrics.csv").read_text()
    assert main(argv) == 0
    assert (out / "metrics.csv").read_text() == metrics  # the finished run is not trained again
    after = {p: p.stat().st_mtime_ns for p in (out / "robustness" / "parts").rglob("*") if p.is_file()}
    assert before and after == before  # no attack batch was redone
    assert len(THEORY_CALLS) == 1  # nor the theory checks


def test_unknown_companion_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "tiny.toml").write_text(TINY)
    code = main(["reproduce", "--config", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "run"),
                 "--companions", "adam", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "adam" in err[0]
