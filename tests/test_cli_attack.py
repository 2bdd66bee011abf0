"""`robustmargin attack` end to end on a tiny run: files, resume after an interruption, bad input."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import robustmargin.data as data
import robustmargin.robustness as robustness
from robustmargin.rundir import record_checkpoint
from robustmargin.cli import main as cli_main
from robustmargin.config import config_from_dict
from robustmargin.rundir import load_split
from robustmargin.models import ModelSpec, build_model

N, BATCH = 12, 5
FAST = ["--n", str(N), "--attacks", "ddn,fmn", "--steps", "10", "--batch-size", str(BATCH), "--quiet"]


_DATA_CACHE: dict[str, dict] = {}
_load_data = data.load_data


def cached_load_data(cfg):
    """Parsing the embedded digits costs a second per call; every test here uses the same subset."""
    key = repr(cfg)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = _load_data(cfg)
    return _DATA_CACHE[key]


@pytest.fixture(autouse=True)
def attack_command_only(monkeypatch):
    # exercise the real dispatcher, independent of the other commands' modules
    monkeypatch.setattr(cli_main, "COMMANDS", ("attack",))
    monkeypatch.setattr(data, "load_data", cached_load_data)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory with two checkpoints of a small bias-free MLP trained briefly on 200 digits."""
    run = tmp_path_factory.mktemp("attack") / "run"
    run.mkdir()
    with pytest.MonkeyPatch.context() as mp:  # module-scoped fixture: no function-scoped monkeypatch
        mp.setattr(data, "load_data", cached_load_data)
        _write_run(run)
    return run


def _write_run(run: Path) -> None:
    cfg = config_from_dict({"data": {"n_train": 200, "n_test": 100},
                            "model": {"name": "mlp", "bias": "none", "hidden": [32]}})
    (run / "config.toml").write_text(cfg.to_toml())
    x, y = load_split(run, "train")
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="mlp", bias="none", hidden=(32,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    epoch = 0
    for until, name in ((2, "model-1"), (30, "model-2")):
        for epoch in range(epoch + 1, until + 1):
            for i in range(0, len(x), 50):
                opt.zero_grad()
                F.cross_entropy(model(x[i:i + 50]), y[i:i + 50]).backward()
                opt.step()
        record_checkpoint(run, model.eval(), name=name, epoch=epoch, log10_loss=-1.0, threshold_log10=None, meta={})
        model.train()


def fresh_copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_end_to_end_files(tiny_run, tmp_path):
    run = fresh_copy(tiny_run, tmp_path)
    assert cli_main.main(["attack", "--run", str(run), *FAST]) == 0
    dist = pd.read_csv(run / "robustness" / "distances.csv")
    assert list(dist.columns) == ["checkpoint", "split", "index", "label", "correct", "attack", "distance"]
    assert len(dist) == 2 * 2 * N * 2
    # the same points for every checkpoint and attack
    for _, group in dist.groupby(["checkpoint", "split", "attack"]):
        assert sorted(group["index"]) == list(range(N))
    assert ((dist["distance"] == 0) == (dist["correct"] == 0)).all()
    assert (dist["distance"] >= 0).all()
    x, y = load_split(run, "test")
    assert dist[dist["split"] == "test"].groupby("index")["label"].first().tolist() == y[:N].tolist()
    curves = pd.read_csv(run / "robustness" / "curves.csv")
    assert list(curves.columns) == ["checkpoint", "split", "epsilon", "robust_accuracy"]
    for (ckpt, split), group in curves.groupby(["checkpoint", "split"]):
        acc = group["robust_accuracy"].to_numpy()
        assert (acc[1:] <= acc[:-1]).all()
        sub = dist[(dist["checkpoint"] == ckpt) & (dist["split"] == split) & (dist["attack"] == "ddn")]
        assert acc[0] == pytest.approx(sub["correct"].mean())
    costs = pd.read_csv(run / "robustness" / "costs.csv")
    assert (costs["forwards"] >= 10 * costs["attacked"]).all() and (costs["seconds"] >= 0).all()


def test_resume_does_not_redo_finished_batches(tiny_run, tmp_path, monkeypatch, capsys):
    run = fresh_copy(tiny_run, tmp_path)
    real = robustness._attack_batch
    calls: list[int] = []

    def interrupted(*args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(robustness, "_attack_batch", interrupted)
    assert cli_main.main(["attack", "--run", str(run), *FAST]) == 130
    assert not (run / "robustness" / "distances.csv").exists()

    calls.clear()
    monkeypatch.setattr(robustness, "_attack_batch", lambda *a, **k: (calls.append(1), real(*a, **k)))
    assert cli_main.main(["attack", "--run", str(run), *FAST]) == 0
    batches = 2 * 2 * 2 * math.ceil(N / BATCH)
    assert len(calls) == batches - 5
    first = pd.read_csv(run / "robustness" / "distances.csv")

    calls.clear()
    assert cli_main.main(["attack", "--run", str(run), *FAST]) == 0
    assert calls == []
    pd.testing.assert_frame_equal(first, pd.read_csv(run / "robustness" / "distances.csv"))

    # a larger --n reuses the full batches and redoes only the short last one (10..11 → 10..14)
    calls.clear()
    more = [a if a != str(N) else str(N + 3) for a in FAST]
    assert cli_main.main(["attack", "--run", str(run), *more]) == 0
    assert len(calls) == 2 * 2 * 2
    grown = pd.read_csv(run / "robustness" / "distances.csv")
    assert len(grown) == 2 * 2 * (N + 3) * 2
    old = grown[grown["index"] < 10].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, first[first["index"] < 10].reset_index(drop=True))


@pytest.mark.parametrize("extra,message", [
    (["--attacks", "ddn,pgd"], "unknown attack 'pgd'"),
    (["--checkpoints", "model-9"], "unknown checkpoint 'model-9'"),
    (["--n", "101", "--split", "test"], "larger than the test split"),
    (["--device", "tpu"], "device"),
])
def test_bad_input_exits_2_with_one_line(tiny_run, extra, message, capsys):
    assert cli_main.main(["attack", "--run", str(tiny_run), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_missing_run_and_missing_checkpoints(tmp_path, capsys):
    assert cli_main.main(["attack", "--run", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "config.toml").write_text(config_from_dict({}).to_toml())
    assert cli_main.main(["attack", "--run", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoints" in err
