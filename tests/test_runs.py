"""Run directories as durable records: attack results accumulate per settings, a moved run keeps
working (data root relative to the current directory), and `status` names what every stage left."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import robustmargin.robustness as robustness
import robustmargin.rundir as rundir
from robustmargin.cli import main as cli_main
from robustmargin.checkpoints import load_checkpoint
from robustmargin.config import config_from_dict
from robustmargin.rundir import Run, record_checkpoint
from robustmargin.status import directory_status, format_status
from tinyrun import write_run

FAST = ["--n", "6", "--attacks", "ddn,fmn", "--steps", "10", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "run")


@pytest.fixture
def run(template, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(template, target)
    return target


def attack(run: Path, *extra: str) -> None:
    assert cli_main.main(["attack", "--run", str(run), *FAST, *extra]) == 0


def read(run: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(run / "robustness" / name)


def states(run: Path) -> dict[str, str]:
    return {s["stage"]: s["state"] for s in directory_status(run)["stages"]}


# --------------------------------------------------------------------------- results accumulate


def test_results_accumulate_over_commands_and_settings_stay_apart(run, monkeypatch):
    attack(run, "--checkpoints", "model-1")
    attack(run, "--checkpoints", "model-2")
    both = read(run, "distances.csv")
    assert sorted(set(both["checkpoint"])) == ["model-1", "model-2"]  # not only the last command's
    assert sorted(set(read(run, "curves.csv")["checkpoint"])) == ["model-1", "model-2"]
    assert sorted(set(read(run, "costs.csv")["checkpoint"])) == ["model-1", "model-2"]
    first = robustness.read_settings(run)
    assert (first["points"], first["attacks"], first["steps"]) == (6, ["ddn", "fmn"], 10)
    assert {(r["checkpoint"], r["split"]) for r in first["results"]} == {
        (c, s) for c in ("model-1", "model-2") for s in ("train", "test")}
    assert first["id"] in rundir.describe_settings(first)

    # other settings: their own set, current now, never mixed with the first
    attack(run, "--checkpoints", "model-1", "--steps", "5")
    other = robustness.read_settings(run)
    assert other["id"] != first["id"] and other["steps"] == 5
    assert set(read(run, "distances.csv")["checkpoint"]) == {"model-1"}
    kept = pd.read_csv(robustness.settings_dir(run, first["id"]) / "distances.csv")
    pd.testing.assert_frame_equal(kept, both)

    # back to the first settings: nothing is redone, and the union is current again
    calls = []
    monkeypatch.setattr(robustness, "_attack_batch", lambda *a, **k: calls.append(a))
    attack(run, "--checkpoints", "model-2")
    assert calls == []
    pd.testing.assert_frame_equal(read(run, "distances.csv"), both)
    assert robustness.read_settings(run)["id"] == first["id"]


def test_points_file_has_minimum_best_attack_and_spread(run):
    attack(run)
    points, dist = read(run, "points.csv"), read(run, "distances.csv")
    assert list(points.columns) == robustness.POINT_COLUMNS
    assert len(points) == 2 * 2 * 6
    for p in points.itertuples(index=False):
        rows = dist[(dist["checkpoint"] == p.checkpoint) & (dist["split"] == p.split) & (dist["index"] == p.index)]
        d = rows.set_index("attack")["distance"]
        assert p.distance == d.min()
        ok = d[np.isfinite(d) & (d > 0)]
        if len(ok):
            assert p.best_attack == ok.idxmin() and p.spread == pytest.approx(ok.max() / ok.min(), rel=1e-15)
        else:
            assert pd.isna(p.spread)


def test_point_summary_reference():
    rows = [("ddn", 0, 1.0), ("fmn", 0, 1.1), ("ddn", 1, 0.0), ("fmn", 1, 0.0), ("ddn", 2, np.inf),
            ("fmn", 2, 0.5), ("ddn", 3, np.inf), ("fmn", 3, np.inf)]
    frame = pd.DataFrame([{"checkpoint": "c", "split": "test", "index": i, "label": 1, "correct": int(d > 0),
                           "attack": a, "distance": d} for a, i, d in rows])
    out = robustness.point_summary(frame)
    assert out["distance"].tolist() == [1.0, 0.0, 0.5, np.inf]
    assert out["best_attack"].tolist() == ["ddn", "", "fmn", ""]
    assert out["spread"].iloc[0] == pytest.approx(1.1) and out["spread"].iloc[2] == 1.0
    assert out["spread"].iloc[[1, 3]].isna().all()


# --------------------------------------------------------------------------- portable runs


def write_cifar(folder: Path) -> None:
    """A few random images in CIFAR-10's python-batch format (data.py reads the format itself)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name, k in [(f"data_batch_{i}", 10) for i in range(1, 6)] + [("test_batch", 20)]:
        batch = {"data": rng.integers(0, 256, (k, 3072), dtype=np.uint8), "labels": [j % 10 for j in range(k)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_moved_project_finds_its_data_relative_to_the_current_directory(tmp_path, monkeypatch):
    project = tmp_path / "project"
    write_cifar(project / "data" / "cifar-10-batches-py")
    cfg = config_from_dict({"data": {"name": "cifar10", "root": "data", "n_train": 40, "n_test": 20},
                            "model": {"name": "mlp", "bias": "none", "hidden": [8]},
                            "train": {"epochs": 2, "batch_size": 20, "thresholds": [], "eval_batch_size": 40}})
    (project / "cfg.toml").write_text(cfg.to_toml())
    monkeypatch.chdir(project)
    assert cli_main.main(["train", "--config", "cfg.toml", "--out", "runs/r", "--quiet"]) == 0
    assert 'root = "data"' in (project / "runs" / "r" / "config.toml").read_text()

    moved = tmp_path / "elsewhere"
    shutil.move(project, moved)  # the old absolute path no longer exists
    monkeypatch.chdir(moved)
    assert cli_main.main(["train", "--resume", "--out", "runs/r", "--epochs", "3", "--quiet"]) == 0
    assert cli_main.main(["attack", "--run", "runs/r", "--n", "4", "--split", "test", "--steps", "5",
                          "--quiet"]) == 0
    assert len(pd.read_csv(moved / "runs" / "r" / "metrics.csv")) == 4  # epochs 0..3

    monkeypatch.chdir(tmp_path)  # elsewhere, the relative root names nothing: one clear line
    assert cli_main.main(["attack", "--run", "elsewhere/runs/r", "--n", "4", "--quiet"]) == 2


def test_moved_run_resumes_and_every_stage_works(tmp_path, monkeypatch):
    cfg = config_from_dict({"data": {"n_train": 200, "n_test": 100},
                            "model": {"name": "mlp", "bias": "none", "hidden": [16]},
                            "train": {"epochs": 3, "batch_size": 50, "thresholds": [-0.5]}})
    (tmp_path / "cfg.toml").write_text(cfg.to_toml())
    first = tmp_path / "a" / "run"
    assert cli_main.main(["train", "--config", str(tmp_path / "cfg.toml"), "--out", str(first), "--quiet"]) == 0
    attack(first, "--split", "test")
    moved = tmp_path / "b" / "moved"
    moved.parent.mkdir()
    shutil.move(first, moved)
    shutil.rmtree(tmp_path / "a")
    monkeypatch.chdir(tmp_path / "b")
    assert cli_main.main(["train", "--resume", "--out", "moved", "--epochs", "5", "--quiet"]) == 0
    assert states(moved)["attack"] == "stale"  # final moved on since it was attacked
    attack(moved, "--split", "test")
    assert cli_main.main(["analyze", "--run", "moved", "--quiet"]) == 0
    assert cli_main.main(["report", "--run", "moved"]) == 0
    assert states(moved) == dict.fromkeys(["train", "attack", "analyze", "report"], "done")


# --------------------------------------------------------------------------- status


def retrain(run: Path, name: str) -> None:
    """Write checkpoint `name` again with other weights, as further training does."""
    import torch

    model = load_checkpoint(run / "checkpoints" / f"{name}.pt")[0]
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)
    row = pd.read_csv(run / "checkpoints" / "index.csv").set_index("name").loc[name]
    record_checkpoint(run, model, name=name, epoch=int(row["epoch"]) + 1, log10_loss=float(row["log10_loss"]),
                      threshold_log10=None, meta={})


def touch(path: Path, when: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("x\n")
    os.utime(path, (when, when))


def test_status_of_what_a_killed_attack_leaves(run, monkeypatch, capsys):
    assert states(run)["attack"] == "missing"
    real = robustness._attack_batch
    calls = []

    def killed(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(robustness, "_attack_batch", killed)
    assert cli_main.main(["attack", "--run", str(run), *FAST]) == 130
    attack_state = directory_status(run)["stages"][1]
    assert attack_state["state"] == "partial" and "3 of 16 batches" in attack_state["detail"]

    monkeypatch.setattr(robustness, "_attack_batch", real)
    monkeypatch.setattr(robustness, "merge_results", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli_main.main(["attack", "--run", str(run), *FAST]) == 130  # all parts, killed before the merge
    assert "not merged" in directory_status(run)["stages"][1]["detail"]
    monkeypatch.undo()
    attack(run)
    assert states(run)["attack"] == "done"

    retrain(run, "model-2")
    assert states(run)["attack"] == "stale"

    assert cli_main.main(["status", "--run", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in out["stages"]] == ["train", "attack", "analyze", "report"]
    assert out["attack_settings"][0]["current"] and out["checkpoints"][1]["name"] == "model-2"


def test_status_of_train_analyze_report_files(run):
    now = time.time()
    assert states(run)["train"] == "missing"
    pd.DataFrame({"epoch": [0, 1], "log10_loss": [-0.1, -0.2]}).to_csv(run / "metrics.csv", index=False)
    touch(run / "state.pt", now - 100)
    assert states(run)["train"] == "partial"  # killed: no final checkpoint of the last epoch
    index = pd.read_csv(run / "checkpoints" / "index.csv")
    final = index.iloc[[-1]].assign(name="final", epoch=1)
    pd.concat([index, final]).to_csv(run / "checkpoints" / "index.csv", index=False)
    touch(run / "config.toml", now - 200)
    assert states(run)["train"] == "done"
    touch(run / "config.toml", now - 50)
    assert states(run)["train"] == "stale"
    touch(run / "config.toml", now - 200)

    assert states(run)["analyze"] == "missing"
    touch(run / "tables" / "table1.csv", now - 90)  # killed after the first table
    assert states(run)["analyze"] == "partial"
    r = Run(run)
    r.write_provenance(r.inputs(None))  # what analyze writes last
    touch(run / "tables" / "table1.csv", now - 90)
    assert states(run)["analyze"] == "partial"  # its certified radii are missing
    touch(run / "robustness" / "certified.csv", now - 90)
    assert states(run)["analyze"] == "done"
    touch(run / "tables" / "table1.csv", time.time() + 5)  # a later analysis killed midway
    assert states(run)["analyze"] == "partial"
    touch(run / "tables" / "table1.csv", now - 90)
    retrain(run, "model-1")  # content, not file times, decides
    assert states(run)["analyze"] == "stale"
    r.write_provenance(r.inputs(None))
    with open(run / "metrics.csv", "a") as f:
        f.write("2,-0.3\n")
    assert states(run)["analyze"] == "stale"
    r.write_provenance(r.inputs(None))
    touch(run / "tables" / "table1.csv", now - 90)
    touch(run / "tables" / "provenance.json", now - 80)
    touch(run / "metrics.csv", now - 100)

    assert states(run)["report"] == "missing"
    touch(run / "figures" / "loss.png", now - 50)  # killed while drawing
    assert states(run)["report"] == "partial"
    touch(run / "report.html", now - 40)
    assert states(run)["report"] == "done"
    touch(run / "tables" / "table1.csv", now - 30)
    assert states(run)["report"] == "stale"


def test_status_of_a_sweep_and_of_a_non_run(template, tmp_path, capsys):
    for name in ("seed=0", "seed=1"):
        shutil.copytree(template, tmp_path / "sweep" / "runs" / name)
    assert cli_main.main(["status", "--run", str(tmp_path / "sweep")]) == 0
    text = capsys.readouterr().out
    assert "2 runs" in text and text.count("  attack   missing") == 2
    assert cli_main.main(["status", "--run", str(tmp_path / "sweep" / "runs")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert cli_main.main(["status", "--run", str(tmp_path / "none")]) == 2
    assert format_status(directory_status(template)).startswith(f"run {template}")
