"""Any PyTorch classifier: attack --model end to end, equality with a robustmargin run, traced Lipschitz
bounds against independent ones, homogeneity, the Python `evaluate`, and bad input through the CLI."""
from __future__ import annotations

import copy
import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustmargin
import robustmargin.data as data
from robustmargin import lipschitz, rundir, usermodel
from robustmargin.cli import main as cli_main
from robustmargin.errors import UserError
from robustmargin.models import ModelSpec, build_model

N = 8
FAST = ["--n", str(N), "--attacks", "ddn,fmn", "--steps", "10", "--batch-size", "5", "--quiet"]

MODELS = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 32, bias=False), nn.ReLU(), nn.Linear(32, 10, bias=False))

    class Net(nn.Module):
        def __init__(self, size=28):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * (size // 4) ** 2, 10, bias=False)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv(x)), 2)
            x = F.avg_pool2d(x, 2)
            return self.fc(x.view(x.size(0), -1))

    def net():
        torch.manual_seed(1)
        return Net()

    def small_net():
        torch.manual_seed(1)
        return Net(size=8)

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(784, 784), nn.Linear(784, 10)

        def forward(self, x):
            x = x.flatten(1)
            return self.b(torch.tanh(self.a(x)) + x)

    def residual():
        torch.manual_seed(2)
        return Residual()

    def scalar():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 1), nn.Flatten(0))

    def number():
        return 3
''')


_CACHE: dict[str, dict] = {}
_load_data = data.load_data


def _cached_load_data(cfg):
    """Parsing the embedded digits costs a second per call; the tests here share a few subsets."""
    if repr(cfg) not in _CACHE:
        _CACHE[repr(cfg)] = _load_data(cfg)
    return _CACHE[repr(cfg)]


@pytest.fixture(autouse=True)
def cached_data(monkeypatch):
    monkeypatch.setattr(data, "load_data", _cached_load_data)


@pytest.fixture
def models(tmp_path) -> Path:
    path = tmp_path / "user_models.py"
    path.write_text(MODELS)
    return path


def cli(*argv: str) -> int:
    return cli_main.main(list(argv))


def test_end_to_end_attack_analyze_report(models, tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "points.npz"
    np.savez(npz, x=rng.random((20, 1, 8, 8), dtype=np.float32), y=np.arange(20) % 10)
    out = tmp_path / "run"
    assert cli("attack", "--model", f"{models}:small_net", "--data", str(npz), "--out", str(out), *FAST) == 0
    config = (out / "config.toml").read_text()
    assert "[external]" in config and f'model = "{models}:small_net"' in config  # as written, never resolved
    assert rundir.read_model_record(out).data_sha256 == rundir.file_sha256(npz)
    index = pd.read_csv(out / "checkpoints" / "index.csv")
    assert index["name"].tolist() == ["model"]
    dist = pd.read_csv(out / "robustness" / "distances.csv")
    assert set(dist["checkpoint"]) == {"model"} and len(dist) == 2 * N
    assert ((dist["distance"] == 0) == (dist["correct"] == 0)).all()

    assert cli("analyze", "--run", str(out), "--quiet") == 0
    lip = pd.read_csv(out / "tables" / "lipschitz.csv")
    assert lip["kind"].tolist() == ["conv", "avg_pool", "linear"]  # the operations that are not 1-Lipschitz
    certified = pd.read_csv(out / "robustness" / "certified.csv")
    best = dist.groupby("index")["distance"].min()
    radius = certified.set_index("index")["radius"]
    assert (radius <= best.reindex(radius.index) + 1e-6).all() and (radius[best > 0] > 0).all()
    mvr = pd.read_csv(out / "tables" / "margin_vs_robustness.csv")
    assert np.isfinite(mvr["normalized_margin"]).all()  # conv bias in the first layer only: homogeneous, L = 2
    assert "KKT residuals left out: the data has no training split" in (out / "tables" / "notes.txt").read_text()

    assert cli("report", "--run", str(out)) == 0
    page = (out / "report.html").read_text()
    assert "External model" in page and "KKT residuals left out" in page and "Paper claims" not in page
    assert (out / "figures" / "robust_accuracy.png").is_file()


def test_untraceable_model_leaves_bounds_out(models, tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "points.npz"
    np.savez(npz, x=rng.random((6, 1, 28, 28), dtype=np.float32), y=np.arange(6) % 10)
    out = tmp_path / "run"
    assert cli("attack", "--model", f"{models}:residual", "--data", str(npz), "--out", str(out), *FAST[2:]) == 0
    assert len(pd.read_csv(out / "robustness" / "distances.csv")) == 2 * 6  # an .npz is the test split
    assert cli("analyze", "--run", str(out), "--quiet") == 0
    notes = (out / "tables" / "notes.txt").read_text()
    assert "Lipschitz bound and certified radii left out: unsupported" in notes and "tanh" in notes
    assert "normalized margins and KKT residuals left out" in notes
    assert pd.read_csv(out / "tables" / "lipschitz.csv").empty
    assert cli("report", "--run", str(out)) == 0


def test_model_distances_equal_the_same_network_as_a_run(models, tmp_path):
    """A robustmargin run and the same network given as --model SPEC --weights CHECKPOINT: equal distances."""
    run = tmp_path / "trained"
    robustmargin.train({"data": {"n_train": 200, "n_test": 100},
                        "model": {"name": "mlp", "bias": "none", "hidden": [32]},
                        "train": {"schedule": "constant", "lr": 0.1, "epochs": 3, "thresholds": [],
                                  "batch_size": 50}}, run)
    ckpt = pd.read_csv(run / "checkpoints" / "index.csv").iloc[-1]
    argv = ["--split", "train", *FAST]
    assert cli("attack", "--run", str(run), "--checkpoints", ckpt["name"], *argv) == 0
    out = tmp_path / "external"
    assert cli("attack", "--model", f"{models}:mlp", "--weights", str(run / "checkpoints" / ckpt["file"]),
               "--data", "mnist5k", "--out", str(out), *argv) == 0
    ours = pd.read_csv(run / "robustness" / "distances.csv")
    theirs = pd.read_csv(out / "robustness" / "distances.csv")
    assert (ours["correct"] == 1).sum() > N  # a trained network: most points attacked
    cols = ["index", "label", "correct", "attack", "distance"]
    pd.testing.assert_frame_equal(ours[cols], theirs[cols])


def _twin(model) -> nn.Module:
    """The robustmargin CNN written as a user would: modules plus a functional forward."""
    convs = [m for m in model.body if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.body if isinstance(m, nn.Linear)]

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.f1, self.f2 = convs[0], convs[1], fcs[0], fcs[1]

        def forward(self, x):
            x = F.max_pool2d(torch.relu(self.c1(x)), 2)
            x = F.max_pool2d(self.c2(x).relu(), kernel_size=2)
            return self.f2(F.relu(self.f1(torch.flatten(x, 1))))

    return Twin().eval()


def test_graph_bound_of_a_module_twin_certifies_no_more_than_the_robustmargin_model():
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="cnn", width=0.125, image_size=8)).eval()
    x = torch.rand(5, 1, 8, 8)
    bound, why = lipschitz.graph_bound(_twin(model), x)
    assert why == ""
    exact = lipschitz.layer_spectral_norms(copy.deepcopy(model).double(), tol=1e-12)  # float64 reference
    assert bound.total >= math.prod(exact) * (1 - 1e-9)  # a sound bound is at least the operator norms
    sigmas = lipschitz.layer_spectral_norms(model)
    y = model(x).argmax(1)
    theirs = lipschitz.certified_radii(model, x, y, sigmas=sigmas).double()
    assert torch.allclose(bound.certified_radii(x, y), theirs, rtol=1e-4)  # float32 logits there, float64 here


def test_kkt_of_a_traced_module_equals_the_robustmargin_model():
    from robustmargin.kkt import kkt_residuals

    torch.manual_seed(0)
    model = build_model(ModelSpec(name="cnn", bias="none", width=0.125, image_size=8)).double().eval()
    x = torch.rand(12, 1, 8, 8, dtype=torch.float64)
    y = model(x).argmax(1)  # every point correctly classified: the KKT residuals are defined
    twin = _twin(model)
    assert usermodel.homogeneity_order(twin, x) == model.order == 4
    ours = kkt_residuals(model, x, y, k=12)
    theirs = kkt_residuals(usermodel.Homogeneous(twin, 4), x, y, k=12)
    assert theirs["eps"] == pytest.approx(ours["eps"], rel=1e-9) and theirs["delta"] == pytest.approx(ours["delta"])


def _dense(fn, shape) -> torch.Tensor:
    """The matrix of a linear map on inputs of `shape`, column by column."""
    n = math.prod(shape)
    return torch.stack([fn(e.reshape(1, *shape)).flatten() for e in torch.eye(n, dtype=torch.float64)], 1)


def test_graph_bound_against_dense_spectral_norms():
    torch.manual_seed(3)
    conv, fc = nn.Conv2d(1, 2, 3, padding=1, bias=False).double(), nn.Linear(18, 3, bias=False).double()
    module = nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), fc)
    bound, why = lipschitz.graph_bound(module, torch.rand(2, 1, 6, 6, dtype=torch.float64))
    assert why == ""
    with torch.no_grad():
        mats = [_dense(lambda v: F.conv2d(v, conv.weight, padding=1), (1, 6, 6)),
                _dense(lambda v: F.avg_pool2d(v, 2), (2, 6, 6)), fc.weight]
        independent = math.prod(float(torch.linalg.matrix_norm(m, ord=2)) for m in mats)
    assert independent * (1 - 1e-9) <= bound.total <= 3 * independent  # sound, and not vacuous
    # and it bounds the network: no pair of inputs is stretched more
    a, b = torch.rand(200, 1, 6, 6, dtype=torch.float64), torch.rand(200, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        ratio = (module(a) - module(b)).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= bound.total


def test_graph_bound_says_what_is_not_supported():
    module = nn.Sequential(nn.Flatten(), nn.Linear(36, 3), nn.Tanh(), nn.Linear(3, 2))
    bound, why = lipschitz.graph_bound(module.eval(), torch.rand(3, 1, 6, 6))
    assert bound is None and "Tanh" in why


def test_homogeneity_order():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 6, 6)
    free = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU(),
                         nn.Linear(8, 3, bias=False))
    assert usermodel.homogeneity_order(free, x) == 3  # a first-layer bias keeps it homogeneous
    biased = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3))
    assert usermodel.homogeneity_order(biased, x) is None
    squared = nn.Sequential(nn.Flatten(), nn.Linear(36, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False))
    assert usermodel.homogeneity_order(squared, x) is None


def test_python_evaluate(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3, bias=False))
    x, y = torch.rand(10, 1, 6, 6), torch.arange(10) % 3
    dist = robustmargin.evaluate(model, x, y, out=tmp_path / "live", attacks="ddn", steps=10)
    assert len(dist) == 10 and dist["index"].tolist() == list(range(10))  # one row per point
    assert {"distance", "best_attack", "spread", "correct"} <= set(dist.columns)
    assert robustmargin.robust_accuracy_curve(dist["distance"], [0.0]).item() == dist["correct"].mean()
    assert (tmp_path / "live" / "report.html").is_file()
    assert pd.read_csv(tmp_path / "live" / "tables" / "lipschitz.csv")["kind"].tolist() == ["linear", "linear"]
    # the run's data is what was passed in
    xs, ys = rundir.load_split(tmp_path / "live", "test")
    assert torch.equal(xs, x) and torch.equal(ys, y)
    again = robustmargin.evaluate(model, x, y, out=tmp_path / "live", attacks="ddn", steps=10, report=False)
    pd.testing.assert_frame_equal(again, dist)  # the same module and data: the run is resumed, not refused
    model[1].weight.data.mul_(2)
    with pytest.raises(UserError, match="different run"):
        robustmargin.evaluate(model, x, y, out=tmp_path / "live", attacks="ddn", steps=10)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        robustmargin.evaluate(model, 2 * x, y, out=tmp_path / "bad")
    with pytest.raises(UserError, match="logits of shape"):
        robustmargin.evaluate(nn.Flatten(0), x, y, out=tmp_path / "bad")


def _bad_weights(tmp_path: Path) -> Path:
    path = tmp_path / "bad.pt"
    torch.save({"1.weight": torch.zeros(5, 784), "3.weight": torch.zeros(10, 5)}, path)
    return path


def _npz(tmp_path: Path, name: str, x: np.ndarray) -> Path:
    path = tmp_path / name
    np.savez(path, x=x, y=np.zeros(len(x), dtype=np.int64))
    return path


def test_bad_input_is_one_line_and_exit_2(models, tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_package_anywhere\n")
    good = ["--data", "mnist5k", "--out", str(tmp_path / "out"), *FAST]
    cases = [
        (["--model", f"{broken}:f", *good], "cannot import"),
        (["--model", "no_such_package_anywhere.models:f", *good], "cannot import"),
        (["--model", f"{models}:absent", *good], "no callable 'absent'"),
        (["--model", f"{models}:number", *good], "not a torch.nn.Module"),
        (["--model", f"{models}:mlp", "--weights", str(_bad_weights(tmp_path)), *good], "do not fit the model"),
        (["--model", f"{models}:mlp", "--data", str(_npz(tmp_path, "flat.npz", np.zeros((4, 784), np.float32))),
          "--out", str(tmp_path / "o"), *FAST], "must be (N, C, H, W)"),
        (["--model", f"{models}:mlp", "--data", str(_npz(tmp_path, "big.npz", np.full((4, 1, 28, 28), 255.0))),
          "--out", str(tmp_path / "o"), *FAST], "[0, 1]"),
        (["--model", f"{models}:scalar", *good], "logits of shape (N, classes >= 2)"),
        (["--model", f"{models}:net", "--data", "mnist5k", *FAST], "--model needs --data and --out"),
        (["--run", str(tmp_path), "--data", "mnist5k", *FAST], "go with --model"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert cli("attack", *argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli("attack", "--run", str(tmp_path), "--model", f"{models}:net")
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err
