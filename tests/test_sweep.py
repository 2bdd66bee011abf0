"""Sweeps: a 2 × 2 grid on tiny budgets, rerun after parts of it were lost; input checked before anything runs;
runs dealt over two gloo ranks."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from robustmargin import distributed
from robustmargin.cli.main import main
from robustmargin.status import run_status
from robustmargin.sweep import parse_sweep, point_name, sweep
from tinyrun import robustmargin
from tinysweep import BASE, GRID, N, NAMES

def _files(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def _layout(files: dict[str, int]) -> set[str]:
    return {re.sub(r"-[0-9a-f]{10}", "-KEY", f) for f in files}


def test_every_grid_point_is_a_complete_run(swept):
    runs = sorted(p.name for p in (swept / "out" / "runs").iterdir())
    assert runs == NAMES
    for name in NAMES:
        status = run_status(swept / "out" / "runs" / name)
        states = {s["stage"]: s["state"] for s in status["stages"]}
        assert states["train"] == states["attack"] == states["analyze"] == "done", status
        config = (swept / "out" / "runs" / name / "config.toml").read_text()
        seed, width = name.split(",")
        assert f"seed = {seed.split('=')[1]}\n" in config and f"width = {float(width.split('=')[1])}\n" in config


def test_rerun_finishes_only_what_is_missing(swept, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(swept / "out", out, symlinks=True)  # copy2: file times kept, so "not redone" can be seen
    runs = out / "runs"
    before = {name: _files(runs / name) for name in NAMES}
    shutil.rmtree(runs / NAMES[0])                          # killed before it started
    shutil.rmtree(runs / NAMES[1] / "robustness")           # killed during the attack
    shutil.rmtree(runs / NAMES[2] / "tables")               # killed during the analysis
    ran = sweep(swept / "sweep.toml", out, n=N)
    assert ran == {NAMES[0]: ["train", "attack", "analyze"], NAMES[1]: ["attack", "analyze"],
                   NAMES[2]: ["analyze"]}
    after = {name: _files(runs / name) for name in NAMES}
    assert after[NAMES[3]] == before[NAMES[3]]             # the untouched run: nothing rewritten
    for name in NAMES[1:3]:                                 # training was not redone
        for kept in ("metrics.csv", "state.pt", "checkpoints/index.csv", "checkpoints/final.pt"):
            assert after[name][kept] == before[name][kept]
    # the lost run is whole again (its part and view folders are named by content, which a retrained run
    # need not repeat bit for bit)
    assert _layout(after[NAMES[0]]) == _layout(before[NAMES[0]])
    assert sweep(swept / "sweep.toml", out, n=N) == {}      # and then there is nothing left to do


@pytest.mark.parametrize("grid, message", [
    ('[grid]\n"train.sed" = [0, 1]\n', "grid key 'train.sed' is not a config key"),
    ('[grid]\n"seed" = [0, 1]\n', "grid key 'seed' is not a config key"),
    ('[grid]\n"train.seed" = []\n', "grid key 'train.seed' has an empty list"),
    ('[grid]\n"train.seed" = 3\n', "must hold a list"),
    ('[grid]\n"train.seed" = [0, "one"]\n', "config key train.seed must be int"),
    ('[grid]\n"model.width" = [0.5, -1.0]\n', "model.width must be positive"),
    ("", "needs a [grid] table"),
])
def test_bad_grid_is_one_line_before_anything_runs(tmp_path, capsys, grid, message):
    (tmp_path / "s.toml").write_text(BASE + grid)
    assert main(["sweep", "--config", str(tmp_path / "s.toml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("robustmargin sweep: error:"), err
    assert not (tmp_path / "out").exists()


def test_unknown_stage_and_another_sweep_are_refused(tmp_path, capsys):
    (tmp_path / "s.toml").write_text(BASE + GRID)
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(tmp_path / "s.toml"), "--out", str(out), "--stages", "train,attak"]) == 2
    assert "unknown stage 'attak'" in capsys.readouterr().err and not out.exists()

    (tmp_path / "other.toml").write_text(BASE + GRID.replace("[0, 1]", "[0, 2]"))
    out.mkdir()
    (out / "sweep.toml").write_text(parse_sweep(BASE + GRID).record())
    assert main(["sweep", "--config", str(tmp_path / "other.toml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds another sweep" in err
    assert not (out / "runs").exists()

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text(BASE)
    assert main(["sweep", "--config", str(tmp_path / "s.toml"), "--out", str(tmp_path / "run")]) == 2
    assert "holds a run" in capsys.readouterr().err


def test_preset_with_overrides_and_names():
    spec = parse_sweep('preset = "quick"\n[train]\nmax_steps = 3\n[grid]\n"model.hidden" = [[4, 4], [8]]\n'
                       '"train.schedule" = ["normalized", "loss-based"]\n"train.max_seconds" = [1.5]\n')
    assert [p.name for p in spec.points] == [
        "model.hidden=4-4,train.schedule=normalized,train.max_seconds=1.5",
        "model.hidden=4-4,train.schedule=loss-based,train.max_seconds=1.5",
        "model.hidden=8,train.schedule=normalized,train.max_seconds=1.5",
        "model.hidden=8,train.schedule=loss-based,train.max_seconds=1.5"]
    first = spec.points[0].config
    assert first.model.name == "cnn" and first.model.width == 0.25      # from the preset
    assert first.train.max_steps == 3 and first.model.hidden == [4, 4]  # from the file, then the grid
    assert point_name({"data.name": "a/b c"}) == "data.name=a_b_c"


def test_alone_presents_one_process_and_restores(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    threads = __import__("torch").get_num_threads()
    with distributed.alone("cpu") as w:
        assert (w.rank, w.size) == (1, 2)                   # the rank's own place, for dealing
        assert distributed.world().size == 1 and not distributed.active()
        assert __import__("torch").get_num_threads() == max(1, distributed.cores() // 2)
    assert distributed.world() == distributed.World(1, 2, 1)
    assert os.environ["LOCAL_WORLD_SIZE"] == "2" and __import__("torch").get_num_threads() == threads


@pytest.mark.parametrize("rank, mine", [(0, ["train.seed=0", "train.seed=2"]), (1, ["train.seed=1"])])
def test_each_rank_runs_its_share_as_a_one_process_job(tmp_path, monkeypatch, rank, mine):
    """One rank of two, in this process: the process group that agrees on the to-do list is left out
    (the test below has it), and without `alone` training would try to join a group of two and fail."""
    from contextlib import nullcontext

    for key, value in {"RANK": rank, "WORLD_SIZE": 2, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": 2}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setattr(distributed, "group", lambda device: nullcontext(distributed.world()))
    (tmp_path / "s.toml").write_text(BASE.replace("max_steps = 20", "max_steps = 2")
                                     + '[grid]\n"train.seed" = [0, 1, 2]\n')
    assert sweep(tmp_path / "s.toml", tmp_path / "out", stages="train") == {name: ["train"] for name in mine}
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == mine
    assert distributed.world() == distributed.World(rank, 2, rank)


def test_runs_are_dealt_over_two_ranks(tmp_path):
    (tmp_path / "s.toml").write_text(BASE.replace("max_steps = 20", "max_steps = 4")
                                     + '[grid]\n"train.seed" = [0, 1]\n')
    done = robustmargin("sweep", "--config", str(tmp_path / "s.toml"), "--out", str(tmp_path / "out"),
                        "--stages", "train", torchrun=2)
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in (0, 1):
        assert f"[sweep rank {rank}] 2 runs, 0 complete, 1 to do here" in done.stderr
    assert "[sweep rank 0] train.seed=0: train done" in done.stderr
    assert "[sweep rank 1] train.seed=1: train done" in done.stderr
    for seed in (0, 1):
        states = {s["stage"]: s["state"] for s in run_status(tmp_path / "out" / "runs" / f"train.seed={seed}")["stages"]}
        assert states["train"] == "done"
