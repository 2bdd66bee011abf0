"""The run directory as a record to trust: settings sets that never empty each other, merged views that a
kill at any write leaves as before or as after, checkpoints known by their content, concurrent attacks
that keep the union, damaged files named in one line, refused commands that leave nothing, portable
records of users' models."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import robustmargin.robustness as robustness
from robustmargin.cli import main as cli_main
from robustmargin.errors import UserError
from robustmargin.rundir import Run
from robustmargin.status import directory_status
from robustmargin.sweep import _stage_done
from crafted import crafted_metrics
from test_runs import retrain
from tinyrun import REPO, write_run

FAST = ["--attacks", "ddn", "--steps", "5", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "run")


@pytest.fixture
def run(template, tmp_path) -> Path:
    shutil.copytree(template, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def cli(*argv: str) -> int:
    return cli_main.main(list(argv))


def attack(run: Path, *extra: str) -> None:
    assert cli("attack", "--run", str(run), "--n", "8", *FAST, *extra) == 0


def states(run: Path) -> dict[str, str]:
    return {s["stage"]: s["state"] for s in directory_status(run)["stages"]}


def consistent(run: Path) -> str:
    """The attack named by the current view's settings, after checking every file agrees with it."""
    results = Run(run).results()
    attacks = set(results.distances["attack"])
    assert attacks == set(results.settings["attacks"])
    for name in ("distances.csv", "points.csv", "curves.csv", "settings.json"):  # the files users read
        assert (run / "robustness" / name).read_bytes() == (results.folder / name).read_bytes()
    return "+".join(sorted(attacks))


# --------------------------------------------------------------------------- settings sets stay whole


def test_a_smaller_n_leaves_the_larger_set_whole(run):
    attack(run, "--split", "test", "--checkpoints", "model-2")
    first = robustness.read_settings(run)["id"]
    kept = pd.read_csv(run / "robustness" / "settings" / first / "distances.csv")
    assert len(kept) == 8
    assert cli("attack", "--run", str(run), "--n", "4", *FAST, "--split", "test", "--checkpoints", "model-2") == 0
    assert robustness.read_settings(run)["id"] != first
    pd.testing.assert_frame_equal(pd.read_csv(run / "robustness" / "settings" / first / "distances.csv"), kept)
    sets = {s["id"]: s for s in directory_status(run)["attack_settings"]}
    assert sets[first]["state"] == "done" and sets[first]["results"] == ["model-2 test"]


def test_a_merge_killed_at_any_write_reads_as_before_or_after(run, tmp_path, monkeypatch):
    attack(run, "--split", "test")
    assert consistent(run) == "ddn"
    # the fmn batches are finished, their merge not yet done
    with monkeypatch.context() as m:
        m.setattr(robustness, "merge_results", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert cli("attack", "--run", str(run), "--n", "8", *FAST, "--split", "test", "--attacks", "fmn") == 130
    r = Run(run)
    settings = robustness.attack_settings(points=8, attacks="fmn", steps=5, batch_size=4)
    labels = {s: y.tolist() for s, (_, y) in r.data().items()}
    real_replace, real_symlink = os.replace, os.symlink
    seen = []
    for k in range(1, 40):
        copy = tmp_path / f"k{k}"
        shutil.copytree(run, copy, symlinks=True)
        calls = [0]

        def failing(real):
            def call(*args, **kwargs):
                calls[0] += 1
                if calls[0] == k:
                    raise OSError("killed")
                return real(*args, **kwargs)
            return call

        monkeypatch.setattr(os, "replace", failing(real_replace))
        monkeypatch.setattr(os, "symlink", failing(real_symlink))
        try:
            robustness.merge_results(Run(copy), settings, labels=labels, index=Run(copy).checkpoints())
            finished = True
        except OSError:
            finished = False
        monkeypatch.setattr(os, "replace", real_replace)
        monkeypatch.setattr(os, "symlink", real_symlink)
        state = consistent(copy)
        assert state in ("ddn", "fmn")
        seen.append(state)
        if finished:
            assert state == "fmn"
            break
    assert finished and seen[0] == "ddn" and len(seen) > 3  # every write was interrupted once


def test_concurrent_attacks_keep_the_union(run):
    argv = ["attack", "--run", str(run), "--n", "8", *FAST]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "robustmargin", *argv,
                               "--checkpoints", name], env=env, stderr=subprocess.PIPE, text=True)
             for name in ("model-1", "model-2")]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    # whichever merged last rebuilt from every part: both checkpoints, each point once per attack
    dist = Run(run).results().distances
    assert sorted(set(dist["checkpoint"])) == ["model-1", "model-2"]
    assert not dist.duplicated(["checkpoint", "split", "index", "attack"]).any() and len(dist) == 2 * 2 * 8
    assert states(run)["attack"] == "done"


# --------------------------------------------------------------------------- checkpoints known by content


def test_retrained_checkpoint_is_refused_by_analyze_and_named_by_status(run, capsys):
    crafted_metrics().to_csv(run / "metrics.csv", index=False)  # a training history for analyze
    attack(run, "--checkpoints", "model-2")
    assert cli("analyze", "--run", str(run), "--quiet") == 0
    assert states(run)["analyze"] == "done"
    retrain(run, "model-2")  # what `train --resume` does to `final`
    assert states(run)["attack"] == "stale" and states(run)["analyze"] == "stale"
    capsys.readouterr()
    assert cli("analyze", "--run", str(run), "--quiet") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint model-2" in err and "--checkpoints model-2" in err
    assert cli("report", "--run", str(run)) == 2
    assert "robustmargin analyze --run" in capsys.readouterr().err
    attack(run, "--checkpoints", "model-2")  # the refresh the message names
    assert cli("analyze", "--run", str(run), "--quiet") == 0
    assert states(run)["attack"] == states(run)["analyze"] == "done"


def test_a_kill_between_checkpoint_and_index_is_refused(run):
    index = pd.read_csv(run / "checkpoints" / "index.csv")
    (run / "checkpoints" / "model-2.pt").write_bytes(b"new weights, the index not yet rewritten")
    with pytest.raises(UserError, match="does not match its row"):
        Run(run).checkpoints()
    assert pd.read_csv(run / "checkpoints" / "index.csv").equals(index)


MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 16, bias=False), nn.ReLU(), nn.Linear(16, 10, bias=False))

    def bn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
""")


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A folder with the user's model module and a small .npz of digits; the current directory."""
    (tmp_path / "mymodels.py").write_text(MODEL)
    x, y = Run(write_run(tmp_path / "donor")).split("test")
    np.savez(tmp_path / "digits.npz", x=x[:12].numpy(), y=y[:12].numpy())
    shutil.rmtree(tmp_path / "donor")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_user_model_run_is_done_not_stale_and_status_is_json(project, capsys):
    assert cli("attack", "--model", "mymodels:mlp", "--data", "digits.npz", "--out", "u", "--n", "4", *FAST) == 0
    assert states(project / "u")["attack"] == "done"  # NaN never takes part in an identity
    capsys.readouterr()
    assert cli("status", "--run", "u", "--json") == 0
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert out["checkpoints"][0]["log10_loss"] is None


def test_refused_commands_leave_nothing_behind(project, capsys):
    base = ["attack", "--model", "mymodels:mlp", "--data", "digits.npz", "--out", "u"]
    for extra in (["--n", "0"], ["--attacks", "ddn,pgd"], ["--device", "cuda"], ["--n", "13"]):
        if extra[0] == "--device" and torch.cuda.is_available():
            continue
        assert cli(*base, *extra, "--quiet") == 2, extra
        assert not (project / "u").exists(), extra
    assert cli(*base, "--n", "4", *FAST) == 0  # the same --out now works


def test_user_model_records_are_portable(project, tmp_path_factory, monkeypatch):
    run = project / "runs" / "u"
    run.mkdir(parents=True)
    shutil.copy(project / "mymodels.py", run / "net.py")  # the SPEC's file and the data inside the run
    shutil.copy(project / "digits.npz", run / "digits.npz")
    assert cli("attack", "--model", "runs/u/net.py:bn", "--data", "runs/u/digits.npz", "--out", "runs/u",
               "--n", "4", *FAST) == 0
    config = (run / "config.toml").read_text()
    assert 'model = "net.py:bn"' in config and 'data = "digits.npz"' in config
    assert str(project) not in config  # nothing absolute
    elsewhere = tmp_path_factory.mktemp("moved")
    shutil.move(run, elsewhere / "u")
    monkeypatch.chdir(elsewhere)
    assert cli("analyze", "--run", "u", "--quiet") == 0 and cli("report", "--run", "u") == 0

    monkeypatch.chdir(project)  # outside the run: the SPEC and data root as written, not resolved
    assert cli("attack", "--model", "mymodels.py:mlp", "--data", "mnist5k", "--out", "v", "--n", "4",
               "--split", "test", *FAST) == 0
    config = (project / "v" / "config.toml").read_text()
    assert 'model = "mymodels.py:mlp"' in config and 'root = "data"' in config


# --------------------------------------------------------------------------- damaged files


def test_damaged_files_are_one_line_and_parts_are_redone(run, capsys):
    attack(run, "--split", "test", "--checkpoints", "model-1")
    parts = sorted((run / "robustness" / "parts").rglob("*.csv"))
    parts[0].write_text("")
    parts[1].write_text("garbage\n1,2\n")
    attack(run, "--split", "test", "--checkpoints", "model-1")
    assert sorted(p.name for p in (run / "robustness" / "parts").rglob("*.bad")) == sorted(
        p.with_suffix(".bad").name for p in parts[:2])
    assert all(len(pd.read_csv(p)) for p in parts[:2])  # redone
    assert len(Run(run).results().distances) == 8

    metrics = run / "metrics.csv"
    metrics.write_text("epoch,log10_loss\nx,-1\n")
    assert states(run)["train"] == "partial"
    index = run / "checkpoints" / "index.csv"
    saved = index.read_text()
    index.write_text("")
    capsys.readouterr()
    assert cli("attack", "--run", str(run), "--n", "8", *FAST) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "index.csv is damaged" in err
    assert states(run)["attack"] == "partial"  # status still answers
    index.write_text(saved)


# --------------------------------------------------------------------------- sweeps reuse only equal settings


def test_sweep_reuses_an_attack_only_under_its_own_settings(run):
    attack(run)  # 5-step DDN on the same 8 points
    assert states(run)["attack"] == "done"
    assert not _stage_done(run, "attack", 8)
    robustness.evaluate_run(run, n=2, progress=False)  # the sweep's settings: the fast ensemble
    assert _stage_done(run, "attack", 2) and not _stage_done(run, "attack", 8)


def test_best_adversarials_are_kept_and_verified(run):
    from robustmargin import rundir as rd

    attack(run, "--split", "test", "--checkpoints", "model-2", "--attacks", "ddn,fmn")
    r = Run(run)
    found = rd.adversarial_examples(run, "model-2", "test")
    points = r.results().points.set_index("index")
    x, y = r.split("test")
    model = r.load_model("model-2.pt")
    finite = points[np.isfinite(points["distance"]) & (points["distance"] > 0)]
    assert sorted(found) == sorted(finite.index) and len(found) > 0
    for i, adv in found.items():
        adv = torch.as_tensor(adv)
        assert float((adv - x[i]).norm()) == pytest.approx(finite.loc[i, "distance"], rel=1e-5)
        assert int(model(adv[None]).argmax()) != int(y[i])  # each one misclassified
