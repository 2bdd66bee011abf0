"""analysis.analyze_run on a synthetic run directory: tiny MLP checkpoints on separable clusters, metrics
and attack distances built here from independent computations (exact SVD, cross-entropy in float64)."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from robustmargin import analysis, data
from robustmargin.analysis import InvariantError, analyze_run
from robustmargin.rundir import record_checkpoint
from robustmargin.config import Config
from robustmargin.models import ModelSpec, build_model
from robustmargin.claims import CLAIM_COLUMNS
from tinyrun import write_results

SPEC = ModelSpec(name="mlp", bias="none", hidden=(12,), in_channels=1, image_size=6, num_classes=3)
STEPS = {"init": 0, "mid": 40, "final": 400}  # checkpoint name -> full-batch SGD steps (epoch = position)


@functools.cache
def make_data(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Three well-separated clusters of 6x6 images in [0,1]; the test split has a few hard points."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(3, 1, 6, 6, generator=g)

    def split(n: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 3
        x = (centers[y] + noise * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1)
        return x, y
    return {"train": split(60, 0.1), "test": split(30, 0.35)}


@functools.cache
def train_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model(SPEC)
    x, y = make_data(seed)["train"]
    params = list(model.parameters())
    models, done = {}, 0
    for name, steps in STEPS.items():
        for _ in range(steps - done):  # plain gradient descent (torch.optim's first use imports dynamo: slow)
            grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= 0.5 * g
        done = steps
        models[name] = build_model(SPEC)
        models[name].load_state_dict(model.state_dict())
    return models


def exact_stats(model, x, y) -> dict:
    """Margins, norms, exact spectral norms (SVD) and certified radii, computed without the package."""
    weights = [m.weight.detach().double() for m in model.weight_layers]
    sigmas = [float(torch.linalg.matrix_norm(w, 2)) for w in weights]
    rhos = [float(w.norm()) for w in weights]
    with torch.no_grad():
        f = model(x).double()
    true = f.gather(1, y[:, None])
    gaps = true - f
    q = gaps.scatter(1, y[:, None], math.inf).amin(1)
    w_last = weights[-1]
    rows = torch.cdist(w_last, w_last)
    r = (gaps / (rows[y] * math.prod(sigmas[:-1]))).scatter(1, y[:, None], math.inf).amin(1)
    r = torch.where(q > 0, r, torch.zeros_like(r))
    s = float(torch.nn.functional.cross_entropy(f, y, reduction="sum"))
    rho = math.sqrt(sum(v * v for v in rhos))
    return {"q": q.numpy(), "radii": r.numpy(), "sigmas": sigmas, "rhos": rhos, "rho": rho, "S": s,
            "acc": float((f.argmax(1) == y).double().mean()),
            "mean_log10_loss": math.log10(s / len(y))}


def metrics_row(epoch: int, model, splits) -> dict:
    tr = exact_stats(model, *splits["train"])
    te = exact_stats(model, *splits["test"])
    q_min = float(tr["q"].min())
    smoothed = -math.log(math.expm1(tr["S"])) / tr["rho"] ** 2
    return {"epoch": epoch, "log10_loss": tr["mean_log10_loss"], "train_acc": tr["acc"], "test_acc": te["acc"],
            "test_log10_loss": te["mean_log10_loss"], "q_min": q_min, "rho": tr["rho"],
            "norm_product": math.prod(tr["rhos"]), "normalized_margin": q_min / tr["rho"] ** 2,
            "normalized_margin_layerwise": q_min / math.prod(tr["rhos"]),
            "smoothed_normalized_margin": smoothed, "alpha": 0.1, "lr_log10": -1.0, "rollbacks": 0,
            "grad_evals": epoch, "seconds": float(epoch), "beta": 0.5}


def factor(index: int) -> float:
    """attack distance / certified radius for the synthetic cw attack."""
    return 1.5 + index % 5


def make_run(root: Path, monkeypatch, *, attacks: bool = True) -> tuple[Path, dict, dict]:
    splits = make_data()
    monkeypatch.setattr(data, "load_data", lambda cfg: splits)
    run = root / "run"
    run.mkdir()
    (run / "config.toml").write_text(Config().to_toml())
    models = train_models()
    rows = []
    for epoch, (name, model) in enumerate(models.items()):
        row = metrics_row(epoch, model, splits)
        rows.append(row)
        record_checkpoint(run, model, name=name, epoch=epoch, log10_loss=row["log10_loss"], threshold_log10=None,
                          meta={})
    pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)
    if attacks:
        dist = []
        for name, model in models.items():
            for split, (x, y) in splits.items():
                ex = exact_stats(model, x, y)
                for i in range(0, len(y), 2):
                    correct = ex["q"][i] > 0
                    d = ex["radii"][i] * factor(i) if correct else 0.0
                    if split == "test" and i == 4 and correct:
                        d = math.inf  # an attack failure
                    for attack, scale in (("cw", 1.0), ("ddn", 1.1)):
                        dist.append({"checkpoint": name, "split": split, "index": i, "label": int(y[i]),
                                     "correct": int(correct), "attack": attack, "distance": d * scale})
        write_results(run, pd.DataFrame(dist))
    return run, models, splits


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        run, models, splits = make_run(tmp_path_factory.mktemp("an"), mp)
        result = analyze_run(run, progress=False)
    finally:
        mp.undo()
    return run, models, splits, result


def test_tables_written(analyzed):
    run, *_ = analyzed
    for name in ("table1", "lipschitz", "kkt", "margin_vs_robustness"):
        assert (run / "tables" / f"{name}.csv").is_file()
        md = (run / "tables" / f"{name}.md").read_text()
        assert md.startswith(f"# {name}") and "|---" in md
    assert (run / "tables" / "margins.csv").is_file()
    certified = pd.read_csv(run / "robustness" / "certified.csv")
    distances = pd.read_csv(run / "robustness" / "distances.csv")
    assert set(map(tuple, certified[["checkpoint", "split", "index"]].values)) == \
        set(map(tuple, distances[["checkpoint", "split", "index"]].values))


def test_table1_reads_metrics(analyzed):
    run, models, splits, result = analyzed
    t1 = result.tables["table1"]
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(t1["checkpoint"]) == list(models)
    assert (t1["source"] == "metrics").all()
    for col in ("log10_loss", "normalized_margin", "normalized_margin_layerwise", "smoothed_normalized_margin",
                "train_acc", "test_acc"):
        np.testing.assert_allclose(t1[col], metrics[col], rtol=1e-12)
    assert not [w for w in result.warnings if "differs" in w]  # recomputed margins agree with metrics
    assert t1["train_acc"].iloc[-1] == 1.0


def test_certified_radii_and_ratio(analyzed):
    run, models, splits, result = analyzed
    certified = result.certified
    mvr = result.tables["margin_vs_robustness"]
    for name, model in models.items():
        for split, (x, y) in splits.items():
            ex = exact_stats(model, x, y)
            part = certified[(certified["checkpoint"] == name) & (certified["split"] == split)]
            idx = part["index"].to_numpy()
            np.testing.assert_allclose(part["radius"], ex["radii"][idx], rtol=1e-5, atol=1e-12)  # power iteration: 1e-6
            row = mvr[(mvr["checkpoint"] == name) & (mvr["split"] == split)].iloc[0]
            correct = ex["q"][idx] > 0
            finite = ~((split == "test") & (idx == 4) & correct)  # make_run's attack failure
            use = correct & finite & (ex["radii"][idx] > 0)
            assert row["median_distance_over_radius"] == pytest.approx(np.median([factor(i) for i in idx[use]]))
            best = np.where(correct, ex["radii"][idx] * np.array([factor(i) for i in idx]), 0.0)
            best[~finite] = np.inf
            assert row["median_distance"] == pytest.approx(np.median(best))
            assert row["median_radius"] == pytest.approx(np.median(ex["radii"][idx]))
            assert row["n"] == len(idx)
            assert row["robust_acc_medium"] == pytest.approx(np.mean(best > row["eps_medium"]))
            sig = math.prod(ex["sigmas"])
            assert row["spectral_margin"] == pytest.approx(ex["q"][idx].min() / sig, rel=1e-6)
            assert row["rho_over_sigma"] == pytest.approx(math.prod(ex["rhos"]) / sig, rel=1e-6)


def test_lipschitz_and_kkt_tables(analyzed):
    run, models, splits, result = analyzed
    lip = result.tables["lipschitz"]
    for name, model in models.items():
        ex = exact_stats(model, *splits["train"])
        part = lip[lip["checkpoint"] == name]
        assert list(part["layer"]) == [1, 2]
        np.testing.assert_allclose(part["sigma"], ex["sigmas"], rtol=1e-5)
        np.testing.assert_allclose(part["rho"], ex["rhos"], rtol=1e-6)
        assert part["sigma_product"].iloc[0] == pytest.approx(math.prod(ex["sigmas"]), rel=1e-5)
    kkt = result.tables["kkt"].set_index("checkpoint")
    assert math.isnan(kkt.loc["init", "eps"])  # not separated: no KKT residual
    assert 0 <= kkt.loc["final", "eps"] < 1 and kkt.loc["final", "k"] == 60


def test_no_robustness_directory(tmp_path, monkeypatch):
    run, models, _ = make_run(tmp_path, monkeypatch, attacks=False)
    result = analyze_run(run, progress=False, kkt_k=5)
    mvr = result.tables["margin_vs_robustness"]
    assert not [c for c in mvr if "distance" in c or "robust_acc" in c]
    assert mvr["median_radius"].notna().all()
    assert set(mvr["n"]) == {60, 30}  # every point of each split
    assert any("no robustness/distances.csv" in w for w in result.warnings)
    md = (run / "tables" / "margin_vs_robustness.md").read_text()
    assert "attack columns are omitted" in md and "median_distance" not in md


def test_certified_violation_names_the_point(tmp_path, monkeypatch):
    run, models, splits = make_run(tmp_path, monkeypatch)
    path = run / "robustness" / "distances.csv"
    dist = pd.read_csv(path)
    ex = exact_stats(models["final"], *splits["train"])
    hit = ((dist["checkpoint"] == "final") & (dist["split"] == "train") & (dist["index"] == 4)
           & (dist["attack"] == "ddn"))
    dist.loc[hit, "distance"] = ex["radii"][4] / 2
    dist.to_csv(path, index=False)
    with pytest.raises(InvariantError, match=r"checkpoint final split train index 4: attack ddn"):
        analyze_run(run, progress=False, kkt_k=5)


def test_smoothed_violation(tmp_path, monkeypatch):
    run, *_ = make_run(tmp_path, monkeypatch, attacks=False)
    metrics = pd.read_csv(run / "metrics.csv")
    metrics.loc[2, "smoothed_normalized_margin"] = metrics.loc[2, "normalized_margin"] * 1.01
    metrics.to_csv(run / "metrics.csv", index=False)
    with pytest.raises(InvariantError, match="epoch 2"):
        analyze_run(run, progress=False)


def test_table1_recomputes_missing_epochs(tmp_path, monkeypatch):
    run, models, splits = make_run(tmp_path, monkeypatch, attacks=False)
    metrics = pd.read_csv(run / "metrics.csv")
    metrics[metrics["epoch"] != 1].to_csv(run / "metrics.csv", index=False)
    t1 = analyze_run(run, progress=False, kkt_k=5).tables["table1"].set_index("checkpoint")
    expected = metrics_row(1, models["mid"], splits)
    assert t1.loc["mid", "source"] == "checkpoint"
    for col in ("log10_loss", "normalized_margin", "normalized_margin_layerwise", "smoothed_normalized_margin",
                "train_acc", "test_acc"):
        assert t1.loc["mid", col] == pytest.approx(expected[col], rel=1e-5)


def test_distances_with_wrong_labels(tmp_path, monkeypatch):
    run, *_ = make_run(tmp_path, monkeypatch)
    path = run / "robustness" / "distances.csv"
    dist = pd.read_csv(path)
    dist.loc[0, "label"] = (dist.loc[0, "label"] + 1) % 3
    dist.to_csv(path, index=False)
    with pytest.raises(analysis.UserError, match="label"):
        analyze_run(run, progress=False)


def test_to_markdown_formats_numbers():
    frame = pd.DataFrame({"name": ["a"], "x": [1234567.0], "y": [float("nan")]})
    md = analysis.to_markdown(frame)
    assert md.splitlines() == ["| name | x | y |", "|---|---:|---:|", "| a | 1.235e+06 |  |"]


# ----------------------------------------------------------------------------- the paper's claims

def test_claims_table_written_by_analyze(analyzed):
    run, models, splits, result = analyzed
    claims = pd.read_csv(run / "tables" / "claims.csv")
    assert list(claims.columns) == list(CLAIM_COLUMNS)
    assert set(claims["claim"]) == {"C1", "C2", "C3", "C6", "C7"}
    assert set(claims["verdict"]) <= {"held", "did not hold", "inconclusive", "not measured"}
    c6 = claims[claims["claim"] == "C6"]
    # both splits attacked at every checkpoint: init is compared with final, paired over the attacked points
    assert set(c6["detail"].str.split(":").str[0]) == {"train", "test"}
    assert c6["detail"].str.contains("init → final").all()
    c7 = claims[claims["claim"] == "C7"].iloc[0]
    acc = {name: float((exact_stats(models[name], *splits["test"])["q"] > 0).mean()) for name in ("init", "final")}
    assert c7["estimate"] == pytest.approx(acc["final"] - acc["init"])
    assert c7["ci_low"] <= c7["estimate"] <= c7["ci_high"] and c7["n"] == len(splits["test"][1])
    assert (run / "tables" / "claims.md").read_text().startswith("# claims")
