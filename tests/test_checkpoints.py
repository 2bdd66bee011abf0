"""Checkpoints of a training run: threshold checkpoints and their index, safe loading, corrupt files."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from robustmargin import load_checkpoint, load_split
from robustmargin.checkpoints import save_checkpoint
from robustmargin.rundir import INDEX_COLUMNS, file_sha256, read_index, record_checkpoint
from robustmargin.config import Config, config_from_dict
from robustmargin.errors import UserError
from robustmargin.models import ModelSpec, build_model
from robustmargin.train import train

train_mod = sys.modules["robustmargin.train"]  # the package attribute `robustmargin.train` is the function




THRESHOLDS = [-0.5, -1.0]


def tiny(**train_keys) -> Config:
    return config_from_dict({
        "data": {"name": "mnist5k", "n_train": 100, "n_test": 50},
        "model": {"name": "mlp", "hidden": [32], "bias": "first"},
        "train": {"schedule": "loss-based", "batch_size": 20, "epochs": 12, "thresholds": THRESHOLDS,
                  **train_keys}})


def trained(out: Path, cfg: Config):
    """Train through the public `train`, keeping the Trainer to compare with what was saved."""
    seen = []

    class Keeping(train_mod.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "Trainer", Keeping)
        train(cfg, out)
    assert len(seen) == 1
    return seen[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = tiny()
    out = tmp_path_factory.mktemp("run")
    trainer = trained(out, cfg)
    return out, cfg, trainer


@pytest.fixture(scope="module")
def decades_run(tmp_path_factory):
    cfg = tiny(checkpoint_every_decades=0.25)
    out = tmp_path_factory.mktemp("decades")
    train(cfg, out)
    return out, cfg


def first_below(metrics: pd.DataFrame, threshold: float) -> pd.Series:
    below = metrics[metrics["log10_loss"] < threshold]
    assert len(below), f"the run never went below 1e{threshold}"
    return below.iloc[0]


def test_index_lists_threshold_checkpoints_at_first_crossing(run):
    out, cfg, _ = run
    index = read_index(out)
    assert list(index.columns) == INDEX_COLUMNS + ["sha256"]
    assert list(pd.read_csv(out / "checkpoints" / "index.csv").columns) == INDEX_COLUMNS + ["sha256"]
    for r in index.itertuples():  # each row names its file by content
        assert r.sha256 == file_sha256(out / "checkpoints" / r.file)
    m = pd.read_csv(out / "metrics.csv")
    thresholded = index[index["threshold_log10"].notna()]
    assert sorted(thresholded["threshold_log10"]) == sorted(THRESHOLDS)
    assert thresholded["name"].is_unique and index["name"].is_unique
    for _, entry in thresholded.iterrows():
        row = first_below(m, entry["threshold_log10"])
        assert entry["epoch"] == row["epoch"], entry["name"]
        assert entry["log10_loss"] == pytest.approx(row["log10_loss"], rel=1e-14)
        assert entry["log10_loss"] < entry["threshold_log10"]
        assert (out / "checkpoints" / entry["file"]).is_file()
    # written in the order they were crossed, with the final model last
    assert list(thresholded["epoch"]) == sorted(thresholded["epoch"])
    assert index["name"].iloc[-1] == "final"


def test_final_checkpoint_row(run):
    out, cfg, _ = run
    raw = (out / "checkpoints" / "index.csv").read_text().splitlines()
    header = raw[0].split(",")
    final = [line.split(",") for line in raw[1:] if line.split(",")[0] == "final"]
    assert len(final) == 1
    final_row = dict(zip(header, final[0]))
    assert final_row["threshold_log10"] == ""  # empty, not "nan" or "None"
    assert final_row["file"] == "final.pt"
    m = pd.read_csv(out / "metrics.csv")
    assert int(final_row["epoch"]) == m["epoch"].iloc[-1] == cfg.train.epochs
    assert float(final_row["log10_loss"]) == pytest.approx(m["log10_loss"].iloc[-1], rel=1e-14)


def test_index_numbers_are_numbers(run):
    out, _, _ = run
    index = pd.read_csv(out / "checkpoints" / "index.csv")
    for col in ("epoch", "log10_loss", "threshold_log10"):
        assert pd.api.types.is_numeric_dtype(index[col]), col
    assert pd.api.types.is_integer_dtype(index["epoch"])


def test_checkpoint_files_are_safe_and_carry_the_model_config(run):
    out, cfg, _ = run
    index = read_index(out)
    for _, entry in index.iterrows():
        payload = torch.load(out / "checkpoints" / entry["file"], weights_only=True)
        assert isinstance(payload, dict)
        spec = payload["model"]
        for key in ("name", "bias", "width", "activation"):
            assert spec[key] == getattr(cfg.model, key), key
        assert list(spec["hidden"]) == cfg.model.hidden
        assert (spec["in_channels"], spec["image_size"], spec["num_classes"]) == (1, 28, 10)
        meta = payload["meta"]
        assert meta["config"]["model"] == cfg.to_dict()["model"]
        assert meta["config"]["train"] == cfg.to_dict()["train"]
        assert meta["epoch"] == entry["epoch"] and meta["name"] == entry["name"]
        assert all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values())
        assert all(v.device.type == "cpu" for v in payload["state_dict"].values())


def test_load_checkpoint_rebuilds_the_trained_model(run):
    out, cfg, trainer = run
    x, y = load_split(out, "train")
    model, meta = load_checkpoint(out / "checkpoints" / "final.pt")
    assert not model.training
    assert meta["epoch"] == cfg.train.epochs
    with torch.no_grad():
        got = model(x)
        want = trainer.model.eval()(x.to(trainer.device)).cpu()
    assert got.shape == (len(y), 10)
    assert torch.equal(got, want)
    # a threshold checkpoint is a different (earlier) model
    early = read_index(out).query("threshold_log10 == -0.5")["file"].iloc[0]
    model_early, meta_early = load_checkpoint(out / "checkpoints" / early)
    assert meta_early["epoch"] < meta["epoch"]
    with torch.no_grad():
        assert not torch.equal(model_early(x), got)


def test_load_checkpoint_accepts_str_paths(run):
    out, _, _ = run
    model, meta = load_checkpoint(str(out / "checkpoints" / "final.pt"))
    assert meta["name"] == "final"


def test_checkpoint_every_decades_adds_checkpoints(run, decades_run):
    out, cfg = decades_run
    index = read_index(out)
    m = pd.read_csv(out / "metrics.csv")
    # same seed and schedule: the same trajectory as the run without decade checkpoints
    assert np.allclose(m["log10_loss"], pd.read_csv(run[0] / "metrics.csv")["log10_loss"], rtol=0, atol=0)
    last = m["log10_loss"].min()
    expected = sorted({-0.25 * j for j in range(1, int(-last // 0.25) + 1)} | set(THRESHOLDS), reverse=True)
    got = index[index["threshold_log10"].notna()]
    assert sorted(got["threshold_log10"], reverse=True) == pytest.approx(expected)
    assert got["name"].is_unique and got["file"].is_unique
    assert set(read_index(run[0])["name"]) < set(index["name"])
    for _, entry in got.iterrows():
        assert entry["epoch"] == first_below(m, entry["threshold_log10"])["epoch"], entry["name"]
        assert (out / "checkpoints" / entry["file"]).is_file()
    assert len(expected) >= 4


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "tail cut": lambda data: data[:-10],
    "garbage": lambda data: np.random.default_rng(1).bytes(len(data)),
    "empty": lambda data: b"",
    "text": lambda data: b"this is not a checkpoint\n",
    "flipped bytes": lambda data: data[:200] + bytes(b ^ 0xFF for b in data[200:400]) + data[400:],
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_a_user_error(run, tmp_path, corruption):
    out, _, _ = run
    path = tmp_path / "final.pt"
    path.write_bytes(CORRUPTIONS[corruption]((out / "checkpoints" / "final.pt").read_bytes()))
    with pytest.raises(UserError, match="final.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("payload", [
    {"x": torch.zeros(1)},                                 # a torch file, but no checkpoint
    [1, 2, 3],                                             # not a dict
    "spec-mismatch",                                       # weights of another architecture
    "unknown-spec-key",                                    # a spec this version cannot build
])
def test_wrong_payload_is_a_user_error(run, tmp_path, payload):
    out, _, _ = run
    if isinstance(payload, str):
        real = torch.load(out / "checkpoints" / "final.pt", weights_only=True)
        if payload == "spec-mismatch":
            real["model"]["hidden"] = [16]
        else:
            real["model"]["depth"] = 3
        payload = real
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(UserError):
        load_checkpoint(path)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UserError):
        load_checkpoint(tmp_path)  # a folder


def test_read_index_errors(tmp_path):
    with pytest.raises(UserError):
        read_index(tmp_path)
    empty = read_index(tmp_path, required=False)
    assert len(empty) == 0 and list(empty.columns) == INDEX_COLUMNS + ["sha256"]
    (tmp_path / "checkpoints").mkdir()
    for damaged in ("a,b\n1,2\n", "", "name,epoch,log10_loss,threshold_log10,file\nfinal,x,1,,final.pt\n"):
        (tmp_path / "checkpoints" / "index.csv").write_text(damaged)
        with pytest.raises(UserError, match="index.csv is damaged"):  # one line, never a pandas error
            read_index(tmp_path)


def test_record_checkpoint_replaces_same_name_and_keeps_precision(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="mlp", hidden=(4,), bias="none"))
    loss = -123.45678901234567
    record_checkpoint(tmp_path, model, name="a", epoch=1, log10_loss=loss, threshold_log10=-100.0, meta={})
    record_checkpoint(tmp_path, model, name="final", epoch=2, log10_loss=0.5, threshold_log10=None, meta={})
    with torch.no_grad():
        model.body[1].weight.mul_(2)
    record_checkpoint(tmp_path, model, name="a", epoch=3, log10_loss=-200.0, threshold_log10=-100.0, meta={"k": 1})
    index = read_index(tmp_path)
    assert list(index["name"]) == ["final", "a"]
    assert index.set_index("name").loc["a", "epoch"] == 3
    assert math.isnan(index.set_index("name").loc["final", "threshold_log10"])
    loaded, meta = load_checkpoint(tmp_path / "checkpoints" / "a.pt")
    assert meta == {"k": 1, "name": "a", "epoch": 3}
    assert torch.equal(loaded.body[1].weight, model.body[1].weight)
    record_checkpoint(tmp_path, model, name="b", epoch=4, log10_loss=loss, threshold_log10=-1e3, meta={})
    assert read_index(tmp_path).set_index("name").loc["b", "log10_loss"] == loss  # full float64 precision


def test_save_checkpoint_is_atomic_on_failure(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="mlp", hidden=(4,), bias="none"))
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, {"v": 1})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, {"v": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind
