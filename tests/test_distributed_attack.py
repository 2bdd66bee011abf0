"""Sharded attacks: two gloo ranks on the CPU give the files of one process; a rerun after a loss of
parts, with another number of ranks, redoes only what is missing."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

import robustmargin.robustness as robustness
from robustmargin.cli import main as cli_main
from tinyrun import robustmargin, write_run

ARGS = ["--n", "8", "--attacks", "ddn,fmn", "--steps", "10", "--batch-size", "3", "--quiet"]
UNITS = 2 * 2 * 2 * 3  # checkpoints × splits × attacks × batches
MERGED = ("distances.csv", "curves.csv", "points.csv", "settings.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(one process, two torchrun ranks) on copies of the same run."""
    root = tmp_path_factory.mktemp("sharded")
    single = write_run(root / "single")
    sharded = root / "sharded"
    shutil.copytree(single, sharded)
    assert cli_main.main(["attack", "--run", str(single), *ARGS]) == 0
    done = robustmargin("attack", "--run", str(sharded), *ARGS, torchrun=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return single, sharded


def parts(run: Path) -> dict[Path, int]:
    folder = run / "robustness" / "parts"
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*.csv")}


def assert_same_files(a: Path, b: Path) -> None:
    for name in MERGED:
        assert (a / "robustness" / name).read_bytes() == (b / "robustness" / name).read_bytes(), name
    costs_a, costs_b = (pd.read_csv(r / "robustness" / "costs.csv").drop(columns="seconds") for r in (a, b))
    pd.testing.assert_frame_equal(costs_a, costs_b)


def test_two_ranks_write_the_files_of_one_process(runs):
    single, sharded = runs
    assert len(parts(sharded)) == UNITS == len(parts(single))
    assert_same_files(single, sharded)  # distances bit for bit: the CSVs are byte-identical
    assert len(pd.read_csv(sharded / "robustness" / "distances.csv")) == 2 * 2 * 2 * 8


def test_rerun_with_another_rank_count_redoes_only_lost_parts(runs, tmp_path, monkeypatch):
    single, sharded = runs
    run = tmp_path / "run"
    shutil.copytree(sharded, run, symlinks=True)
    lost = sorted(parts(run))[::5]  # what a killed rank would not have written
    for rel in lost:
        (run / "robustness" / "parts" / rel).unlink()
    for name in MERGED:
        (run / "robustness" / name).unlink()
    kept = parts(run)
    calls = []
    real = robustness._attack_batch
    monkeypatch.setattr(robustness, "_attack_batch", lambda *a, **k: (calls.append(a[-1]), real(*a, **k)))
    assert cli_main.main(["attack", "--run", str(run), *ARGS]) == 0  # one process now
    assert len(calls) == len(lost)
    after = parts(run)
    assert {p: after[p] for p in kept} == kept  # no finished part was rewritten
    assert_same_files(single, run)


def test_dash_dash_form_parses_in_process(tmp_path, capsys):
    assert cli_main.main(["--", "attack", "--run", str(tmp_path / "none"), "--n", "4"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_single_process_killed_then_finished_by_two_ranks(runs, tmp_path, monkeypatch):
    single, _ = runs
    run = write_run(tmp_path / "run")
    real = robustness._attack_batch
    calls = []

    def interrupted(*args, **kwargs):
        if len(calls) == 7:
            raise KeyboardInterrupt
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(robustness, "_attack_batch", interrupted)
    assert cli_main.main(["attack", "--run", str(run), *ARGS]) == 130
    kept = parts(run)
    assert len(kept) == 7
    done = robustmargin("attack", "--run", str(run), *ARGS, torchrun=2)
    assert done.returncode == 0, done.stderr[-3000:]
    after = parts(run)
    assert len(after) == UNITS and {p: after[p] for p in kept} == kept
    assert_same_files(single, run)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_snake_deal_partitions_and_alternates(size):
    from robustmargin.distributed import World, deal

    items = list(range(10))
    shares = [deal(items, World(rank, size), snake=True) for rank in range(size)]
    assert sorted(sum(shares, [])) == items
    if size == 2:
        assert shares == [[0, 3, 4, 7, 8], [1, 2, 5, 6, 9]]


GROUP_TIMEOUT_S, LATE_S = 3, 6  # rank 1's first batch ends well after the process group's own timeout


def _late_rank(rank: int, port: int, run: str) -> None:
    import functools
    import os
    import time
    from datetime import timedelta

    import torch

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_group = torch.distributed.init_process_group
    torch.distributed.init_process_group = functools.partial(init_group, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    real = robustness._attack_batch

    def late(*args, **kwargs):
        if rank == 1 and not getattr(late, "slept", False):
            late.slept = True
            time.sleep(LATE_S)
        return real(*args, **kwargs)

    robustness._attack_batch = late
    robustness.evaluate_run(run, splits=("test",), n=8, attacks="ddn,fmn", steps=10, batch_size=3, progress=False)


def test_a_rank_late_past_the_group_timeout_still_gives_the_files_of_one_process(runs, tmp_path):
    import socket

    import torch.multiprocessing as mp

    single, _ = runs  # attacked on both splits; this compares the test split's merged view
    late = tmp_path / "late"
    shutil.copytree(single, late, symlinks=True)
    shutil.rmtree(late / "robustness")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_late_rank, args=(port, str(late)), nprocs=2, join=True)
    one = tmp_path / "one"
    shutil.copytree(single, one, symlinks=True)
    shutil.rmtree(one / "robustness")
    robustness.evaluate_run(one, splits=("test",), n=8, attacks="ddn,fmn", steps=10, batch_size=3, progress=False,
                            sharded=False)
    for name in ("distances.csv", "points.csv"):
        assert (late / "robustness" / name).read_bytes() == (one / "robustness" / name).read_bytes(), name
