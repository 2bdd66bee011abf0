"""`robustmargin train` end to end on tiny configs: files written, overrides, resume, and bad input
(exit 2, one line on stderr, no traceback)."""
from __future__ import annotations

import csv
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from robustmargin import load_checkpoint
from robustmargin.cli import main as cli_main
from robustmargin.config import load_config

train_mod = importlib.import_module("robustmargin.train")  # the package attribute `robustmargin.train` is the function

TINY = """\
[data]
name = "mnist5k"
n_train = 60
n_test = 50

[model]
name = "mlp"
hidden = [32]
bias = "none"

[train]
schedule = "loss-based"
batch_size = 20
epochs = 3
thresholds = [-0.3]
"""




def cli(argv: list[str]) -> int:
    """cli_main.main, with argparse's SystemExit turned into its exit code."""
    try:
        return cli_main.main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def write_config(folder: Path, text: str = TINY, name: str = "tiny.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def without_seconds(table):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in table]


def assert_one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- success ------------------------------------------------------------------------------------------

def test_train_from_config_file(tmp_path, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "run"
    assert cli(["train", "--config", config, "--out", out, "--epochs", "2", "--seed", "3", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # --quiet: no progress bar, no summary
    saved = load_config(out / "config.toml")
    assert saved.train.epochs == 2 and saved.train.seed == 3  # flags override the file
    assert saved.train.thresholds == [-0.3] and saved.data.n_train == 60 and saved.model.hidden == [32]
    m = pd.read_csv(out / "metrics.csv")
    assert list(m["epoch"]) == [0, 1, 2]
    assert (m["log10_loss"].diff().dropna() < 0).all()
    index = pd.read_csv(out / "checkpoints" / "index.csv")
    assert index["name"].iloc[-1] == "final" and index["epoch"].iloc[-1] == 2
    model, meta = load_checkpoint(out / "checkpoints" / "final.pt")
    assert meta["config"]["train"]["seed"] == 3
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_seed_flag_changes_the_run(tmp_path):
    config = write_config(tmp_path)
    for seed in (0, 1):
        assert cli(["train", "--config", config, "--out", tmp_path / f"s{seed}", "--epochs", "1",
                    "--seed", seed, "--quiet"]) == 0
    a, b = (pd.read_csv(tmp_path / f"s{s}" / "metrics.csv") for s in (0, 1))
    assert a["log10_loss"].iloc[0] != b["log10_loss"].iloc[0]


def test_default_out_is_runs_config_name(tmp_path, monkeypatch):
    config = write_config(tmp_path, name="my-exp.toml")
    monkeypatch.chdir(tmp_path)
    assert cli(["train", "--config", config, "--epochs", "1", "--quiet"]) == 0
    assert (tmp_path / "runs" / "my-exp" / "metrics.csv").is_file()
    assert (tmp_path / "runs" / "my-exp" / "checkpoints" / "final.pt").is_file()


def test_not_quiet_prints_a_summary(tmp_path, capsys):
    config = write_config(tmp_path)
    assert cli(["train", "--config", config, "--out", tmp_path / "run", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "run") in out and "Traceback" not in out


def test_resume_extends_a_run_exactly(tmp_path):
    config = write_config(tmp_path)
    short, whole = tmp_path / "short", tmp_path / "whole"
    assert cli(["train", "--config", config, "--out", short, "--epochs", "1", "--quiet"]) == 0
    # --resume with only --out: the run's own config.toml is used
    assert cli(["train", "--resume", "--out", short, "--epochs", "3", "--quiet"]) == 0
    assert cli(["train", "--config", config, "--out", whole, "--epochs", "3", "--quiet"]) == 0
    assert without_seconds(rows(short)) == without_seconds(rows(whole))
    a = torch.load(short / "checkpoints" / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(whole / "checkpoints" / "final.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_interrupt_exits_130_and_resume_completes(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "run"
    original, calls = train_mod.Trainer.sgd_pass, {"n": 0}

    def killing_pass(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(train_mod.Trainer, "sgd_pass", killing_pass)
    assert cli(["train", "--config", config, "--out", out, "--quiet"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupt" in err[0]
    monkeypatch.setattr(train_mod.Trainer, "sgd_pass", original)
    assert cli(["train", "--config", config, "--out", out, "--resume", "--quiet"]) == 0
    assert [r["epoch"] for r in rows(out)] == ["0", "1", "2", "3"]


# --- bad input: exit 2, one line -------------------------------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    (TINY.replace("epochs = 3", "epochs = 3\nfoo = 1"), "train.foo"),
    (TINY + "\n[bogus]\nx = 1\n", "bogus"),
    (TINY.replace("epochs = 3", "epochs = 3\nlr = -0.1"), "train.lr"),
    (TINY.replace("epochs = 3", "epochs = 3\nlr = \"fast\""), "train.lr"),
    (TINY.replace("batch_size = 20", "batch_size = 0"), "train.batch_size"),
    (TINY.replace('schedule = "loss-based"', 'schedule = "cosine"'), "train.schedule"),
    (TINY.replace("thresholds = [-0.3]", "thresholds = [3.0]"), "train.thresholds"),
    (TINY.replace("n_train = 60", "n_train = 6000"), "mnist5k"),
    (TINY.replace("batch_size = 20", "batch_size = 100"), "batch_size"),
    (TINY.replace("[train]", "[train"), "TOML"),
])
def test_bad_config_file(tmp_path, capsys, text, needle):
    config = write_config(tmp_path, text)
    out = tmp_path / "run"
    code = cli(["train", "--config", config, "--out", out, "--quiet"])
    assert_one_line_error(capsys, code, needle)
    assert not (out / "metrics.csv").exists()


def test_unknown_preset(tmp_path, capsys):
    code = cli(["train", "--preset", "no-such-preset", "--out", tmp_path / "run", "--quiet"])
    assert_one_line_error(capsys, code, "no-such-preset", "quick")
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path, capsys):
    code = cli(["train", "--config", tmp_path / "absent.toml", "--out", tmp_path / "run", "--quiet"])
    assert_one_line_error(capsys, code, "absent.toml")


def test_non_utf8_config_file(tmp_path, capsys):
    config = tmp_path / "latin.toml"
    config.write_bytes(TINY.replace('"mlp"', '"mlp"  # \xe9t\xe9').encode("latin-1"))
    code = cli(["train", "--config", config, "--out", tmp_path / "run", "--quiet"])
    assert_one_line_error(capsys, code, "UTF-8")


def test_config_file_is_a_folder(tmp_path, capsys):
    code = cli(["train", "--config", tmp_path, "--out", tmp_path / "run", "--quiet"])
    assert_one_line_error(capsys, code)


@pytest.mark.parametrize("flags, needle", [
    (["--epochs", "-1"], "train.epochs"),
    (["--epochs", "abc"], "--epochs"),
    (["--device", "gpu"], "train.device"),
    (["--lr", "0.1"], "--lr"),
    (["--preset", "quick"], "--preset"),  # with --config: mutually exclusive
])
def test_bad_flags(tmp_path, capsys, flags, needle):
    config = write_config(tmp_path)
    code = cli(["train", "--config", config, "--out", tmp_path / "run", "--quiet", *flags])
    assert_one_line_error(capsys, code, needle)
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_no_config_source(tmp_path, capsys):
    assert_one_line_error(capsys, cli(["train", "--quiet"]), "--preset", "--config")
    assert_one_line_error(capsys, cli(["train", "--resume", "--out", tmp_path / "none", "--quiet"]), "none")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path, capsys):
    config = write_config(tmp_path)
    code = cli(["train", "--config", config, "--out", tmp_path / "run", "--device", "cuda", "--quiet"])
    assert_one_line_error(capsys, code, "cuda")
    assert not (tmp_path / "run").exists()


def test_resume_into_run_of_another_config(tmp_path, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "run"
    assert cli(["train", "--config", config, "--out", out, "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    before = (out / "metrics.csv").read_bytes()
    other = write_config(tmp_path, TINY.replace("epochs = 3", "epochs = 3\nalpha0 = 0.3"), "other.toml")
    code = cli(["train", "--config", other, "--out", out, "--resume", "--quiet"])
    assert_one_line_error(capsys, code, "train.alpha0")
    code = cli(["train", "--config", config, "--out", out, "--resume", "--seed", "7", "--quiet"])
    assert_one_line_error(capsys, code, "train.seed")
    assert (out / "metrics.csv").read_bytes() == before


def test_fresh_train_into_existing_run(tmp_path, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "run"
    assert cli(["train", "--config", config, "--out", out, "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    before = (out / "metrics.csv").read_bytes()
    code = cli(["train", "--config", config, "--out", out, "--epochs", "2", "--quiet"])
    assert_one_line_error(capsys, code, "--resume")
    assert (out / "metrics.csv").read_bytes() == before


# --- as a program -------------------------------------------------------------------------------------------

def _program(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "robustmargin", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_module_help():
    proc = _program("train", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--preset", "--config", "--out", "--resume", "--device", "--epochs", "--seed"):
        assert flag in proc.stdout
    assert "quick" in proc.stdout  # the presets are listed


@pytest.mark.slow  # a second interpreter start (torch, seaborn): several seconds on a loaded machine
def test_module_bad_input_exit_code(tmp_path):
    proc = _program("train", "--preset", "no-such-preset", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""


# Values a code review found accepted: each must be refused before any work, naming its key.
REFUSED = [
    ("train", "alpha0", "inf"), ("train", "lr", "inf"), ("train", "r_up", "inf"), ("train", "r_down", "inf"),
    ("train", "stop_log10_loss", "nan"), ("train", "batch_loss_ceiling", "1.0"),
    ("train", "batch_loss_ceiling", "0.5"), ("train", "lr_floor", "0.1"), ("train", "lr_floor", "1.0"),
    ("data", "split_seed", "-1"), ("model", "width", "inf"), ("train", "checkpoint_every_decades", "1e-5"),
]


@pytest.mark.parametrize("section,key,value", REFUSED)
def test_refused_values_exit_2_naming_the_key(tmp_path, capsys, section, key, value):
    text = TINY.replace(f"[{section}]\n", f"[{section}]\n{key} = {value}\n")
    out = tmp_path / "run"
    assert cli(["train", "--config", write_config(tmp_path, text), "--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{section}.{key}" in err[0]
    assert not out.exists()  # refused before any work


def test_lr_floor_is_checked_against_the_constant_rate(tmp_path, capsys):
    text = TINY.replace('schedule = "loss-based"', 'schedule = "constant"\nlr = 0.01\nlr_floor = 0.05')
    assert cli(["train", "--config", write_config(tmp_path, text), "--out", tmp_path / "run", "--quiet"]) == 2
    assert "train.lr_floor" in capsys.readouterr().err
