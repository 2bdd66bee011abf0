"""A user's own model, first-class: `evaluate` on any module (BatchNorm, residual, numpy arrays, a
DataLoader), robust accuracy at chosen ε with intervals, a report that shows what applies, warnings for
traps, SPEC modules from the current directory, and the embedded splits for training one's own model."""
from __future__ import annotations

import math
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import robustmargin as rm
from robustmargin.analysis import robust_accuracy_table
from robustmargin.cli import main as cli_main
from robustmargin.data import load_dataset
from robustmargin.rundir import Run
from robustmargin.usermodel import state_sha256

FAST = ["--attacks", "ddn", "--steps", "5", "--batch-size", "4", "--quiet"]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 36, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc((h + x).flatten(1))


def data(n: int = 12):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 6, 6, generator=g), torch.arange(n) % 3


def test_state_hash_of_batchnorm_modules():
    model = Residual()
    assert model.bn.num_batches_tracked.dim() == 0
    before = state_sha256(model)
    model.bn.num_batches_tracked += 1
    assert state_sha256(model) != before  # the 0-dim buffer takes part


def test_evaluate_batchnorm_residual_gives_one_row_per_point(tmp_path):
    torch.manual_seed(0)
    model = Residual()
    x, y = data()
    points = rm.evaluate(model, x.numpy(), y.numpy(), out=tmp_path / "r", attacks="ddn", steps=5)
    assert list(points["index"]) == list(range(12)) and {"distance", "best_attack", "spread"} <= set(points)
    curve = rm.robust_accuracy_curve(points["distance"], [0.0, 0.5])
    assert curve[0].item() == pytest.approx(points["correct"].mean())
    page = (tmp_path / "r" / "report.html").read_text()
    assert "id='summary'" in page and "The paper's Table 1" not in page
    assert "Margins and accuracy per checkpoint" in page
    assert "<table" in page and "<th>checkpoint</th>\n    </tr>" not in page  # no table of names alone

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    again = rm.evaluate(model, loader, out=tmp_path / "r", attacks="ddn", steps=5, report=False)
    pd.testing.assert_frame_equal(again, points)  # the same data through a DataLoader: the same run


def test_robust_accuracy_at_chosen_eps_with_exact_intervals():
    best = pd.DataFrame({"checkpoint": "m", "split": "test", "index": range(4), "distance": [0.0, 0.4, 1.2, math.inf]})
    table = robust_accuracy_table(best, [0.5, 1.0])
    assert table["robust_accuracy"].tolist() == [0.5, 0.5] and set(table["source"]) == {"chosen"}
    # the exact 95 % interval of 2 in 4: [0.0676, 0.9324]
    assert table["ci_low"].tolist() == pytest.approx([0.0676] * 2, abs=1e-4)
    assert table["ci_high"].tolist() == pytest.approx([0.9324] * 2, abs=1e-4)
    assert set(robust_accuracy_table(best, None)["source"]) == {"quartile"}


MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    def probs():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Softmax(dim=1))

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 16, bias=False), nn.ReLU(), nn.Linear(16, 10, bias=False))
""")


def test_spec_from_current_directory_warnings_and_eps(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymods.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli_main.main(["attack", "--model", "mymods:probs", "--data", "mnist5k", "--split", "test",
                          "--out", "p", "--n", "4", *FAST]) == 0
    err = capsys.readouterr().err
    assert "no --weights given" in err and "look like probabilities" in err
    import mymods  # the module the SPEC names, trained on the embedded splits as a user would

    model = mymods.mlp()
    x, y = load_dataset("mnist5k", n_train=500)["train"]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "mlp.pt")
    assert cli_main.main(["attack", "--model", "mymods:mlp", "--weights", "mlp.pt", "--data", "mnist5k",
                          "--split", "test", "--out", "m", "--n", "6", "--attacks", "ddn", "--steps", "60",
                          "--quiet"]) == 0
    assert cli_main.main(["analyze", "--run", "m", "--quiet"]) == 0
    table = pd.read_csv(tmp_path / "m" / "tables" / "robust_accuracy.csv")
    assert set(table["source"]) == {"quartile"}
    Run(tmp_path / "m").choose_epsilons([0.5, 1.0, 1.5])
    assert cli_main.main(["analyze", "--run", "m", "--quiet"]) == 0
    table = pd.read_csv(tmp_path / "m" / "tables" / "robust_accuracy.csv")
    assert table["epsilon"].tolist() == [0.5, 1.0, 1.5] and set(table["source"]) == {"chosen"}
    assert cli_main.main(["report", "--run", "m"]) == 0
    page = (tmp_path / "m" / "report.html").read_text()
    assert "robust accuracy at ε = 0.5:" in page and "fig-adversarials" in page


def test_load_dataset_gives_the_splits_runs_use():
    splits = load_dataset("mnist5k", n_train=300, n_test=200)
    (xt, yt), (xs, ys) = splits["train"], splits["test"]
    assert len(yt) == 300 and len(ys) == 200
    assert len(np.unique(yt.numpy())) == 10  # shuffled and stratified, not sorted by class
    flat = {tuple(v.flatten().tolist()) for v in xt[:50]}
    assert not any(tuple(v.flatten().tolist()) in flat for v in xs)  # disjoint
    with pytest.raises(rm.UserError, match="dataset must be one of"):
        load_dataset("imagenet")


def test_reproduce_and_sweep_check_the_attack_before_training(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('[data]\nn_train = 60\nn_test = 50\n[model]\nname = "mlp"\nhidden = [4]\n'
                                     '[train]\nepochs = 1\n')
    for n in ("0", "60"):
        assert cli_main.main(["reproduce", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "r"),
                              "--n", n, "--quiet"]) == 2
        assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "r").exists()
    (tmp_path / "s.toml").write_text((tmp_path / "c.toml").read_text() + '[grid]\n"train.seed" = [0, 1]\n')
    assert cli_main.main(["sweep", "--config", str(tmp_path / "s.toml"), "--out", str(tmp_path / "s"),
                          "--n", "60", "--quiet"]) == 2
    assert "larger than the test split (50 points)" in capsys.readouterr().err
    assert not (tmp_path / "s" / "runs").exists()


def test_masking_check_runs_for_user_models_and_the_report_warns(tmp_path):
    import json

    torch.manual_seed(0)
    model = Residual()
    x, y = data(8)
    rm.evaluate(model, x, y, out=tmp_path / "r", attacks="ddn", steps=20, report=False)
    record = json.loads((tmp_path / "r" / "robustness" / "masking.json").read_text())
    assert len(record["points"]) == 8 and len(record["decision"]) == 8
    gradient, decision = np.array(record["gradient"], float), np.array(record["decision"], float)
    assert [p for p, g, d in zip(record["points"], gradient, decision) if d < 0.95 * g] == record["suspect"]
    record["suspect"] = record["points"][:5]  # as a masked model would give
    (tmp_path / "r" / "robustness" / "masking.json").write_text(json.dumps(record))
    from robustmargin.report import write_report
    write_report(tmp_path / "r")
    assert "Possible gradient masking" in (tmp_path / "r" / "report.html").read_text()


def test_compare_takes_user_model_runs_and_mixed_runs(tmp_path):
    torch.manual_seed(0)
    x, y = data(8)
    for name, width in (("a", 2), ("b", 4)):
        torch.manual_seed(width)
        model = nn.Sequential(nn.Flatten(), nn.Linear(36, width * 4, bias=False), nn.ReLU(),
                              nn.Linear(width * 4, 3, bias=False))
        rm.evaluate(model, x, y, out=tmp_path / name, attacks="ddn", steps=20, report=False)
    assert cli_main.main(["compare", "--runs", str(tmp_path / "a"), str(tmp_path / "b"),
                          "--out", str(tmp_path / "cmp")]) == 0
    rows = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert rows["run"].tolist() == ["a", "b"] and rows["median_distance"].notna().all()
    assert (tmp_path / "cmp" / "compare.html").is_file()


def test_attack_a_seeded_random_sample_with_chosen_eps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymods.py").write_text(MODELS)
    argv = ["attack", "--model", "mymods.py:mlp", "--data", "mnist5k", "--split", "test", "--sample", "6",
            "--seed", "3", "--eps", "1.0,0.5", *FAST]
    assert cli_main.main([*argv, "--out", "s"]) == 0
    with np.load(tmp_path / "s" / "data.npz") as f:
        index = f["index"]
    assert len(index) == 6 and len(set(index)) == 6 and list(index) != list(range(6))
    y = load_dataset("mnist5k")["test"][1]
    assert torch.equal(rm.load_split(tmp_path / "s", "test")[1], y[torch.as_tensor(index)])
    assert Run(tmp_path / "s").epsilons() == [0.5, 1.0]
    assert cli_main.main([*argv, "--out", "t"]) == 0  # the same seed: the same points
    with np.load(tmp_path / "t" / "data.npz") as f:
        assert list(f["index"]) == list(index)
    assert cli_main.main(["attack", "--model", "mymods.py:mlp", "--data", "mnist5k", "--sample", "6",
                          "--out", "u", "--quiet"]) == 2  # both splits: which one to draw from?
    assert not (tmp_path / "u").exists()
