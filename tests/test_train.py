"""The training loop (robustmargin.train): metrics.csv contents and consistency, schedules, exact resume."""
from __future__ import annotations

import csv
import dataclasses
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from robustmargin import load_checkpoint, load_split
from robustmargin.config import SCHEDULES, Config, TrainConfig, config_from_dict, load_config, with_overrides
from robustmargin.errors import UserError
from robustmargin.train import train

# `import robustmargin.train as m` would give the function: the package exports `train` under that name
train_mod = sys.modules["robustmargin.train"]

# the third schedule (ours, after constant and the paper's loss-based) is being tuned and renamed
OURS = next(s for s in SCHEDULES if s not in ("constant", "loss-based"))
N_TRAIN, N_TEST, BATCH = 100, 50, 20
PASSES = math.ceil(N_TRAIN / BATCH)  # SGD steps per pass over the training set

CONTRACT = ["epoch", "log10_loss", "train_acc", "test_acc", "q_min", "rho", "norm_product", "normalized_margin",
            "normalized_margin_layerwise", "smoothed_normalized_margin", "alpha", "lr_log10", "rollbacks", "seconds"]
EXTRA = ["test_log10_loss", "beta", "grad_evals"] + [f"support_{k}" for k in range(1, 8)]

MODELS = {
    # name: (model section, homogeneity order of each weight layer)
    "mlp": ({"name": "mlp", "hidden": [32], "bias": "none"}, [1, 1]),
    "mlp-relu2": ({"name": "mlp", "hidden": [32], "bias": "first", "activation": "relu2"}, [2, 1]),
    "cnn": ({"name": "cnn", "width": 0.1, "bias": "first"}, [1, 1, 1, 1]),
}


# --- shared fixtures ------------------------------------------------------------------------------



def tiny(schedule: str = "loss-based", model: str = "mlp", **train_keys) -> Config:
    return config_from_dict({
        "data": {"name": "mnist5k", "n_train": N_TRAIN, "n_test": N_TEST},
        "model": MODELS[model][0],
        "train": {"schedule": schedule, "batch_size": BATCH, "epochs": 12, "thresholds": [-0.5, -1.0],
                  "lr": 0.05, **train_keys}})


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def without_seconds(table: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in table]


def final_params(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "final.pt", weights_only=True)["state_dict"]


RUNS = {
    # name: (schedule, model, extra train keys)
    "loss-based": ("loss-based", "mlp", {}),
    OURS: (OURS, "mlp-relu2", {}),
    "constant": ("constant", "cnn", {"lr": 0.1, "epochs": 6}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Config]]:
    out = {}
    for name, (schedule, model, keys) in RUNS.items():
        cfg = tiny(schedule, model, **keys)
        out[name] = (train(cfg, tmp_path_factory.mktemp(name)), cfg)
    return out


@pytest.fixture(params=list(RUNS))
def run(request, runs):
    path, cfg = runs[request.param]
    return request.param, path, cfg, pd.read_csv(path / "metrics.csv")


# --- metrics.csv ------------------------------------------------------------------------------------

def test_metrics_columns_and_numbers(run):
    name, path, cfg, m = run
    m_layers = len(MODELS[RUNS[name][1]][1])
    required = CONTRACT + EXTRA + [f"rho_{i}" for i in range(1, m_layers + 1)]
    assert not set(required) - set(m.columns), f"missing columns {set(required) - set(m.columns)}"
    assert f"rho_{m_layers + 1}" not in m.columns
    # every cell of every row is a number (ints, floats; nan/inf spelled so that float() reads them)
    for r in rows(path):
        for key, value in r.items():
            float(value)
    assert all(pd.api.types.is_numeric_dtype(m[c]) for c in m.columns)
    assert m[CONTRACT + EXTRA].notna().all().all()
    assert len(m) == cfg.train.epochs + 1
    assert list(m["epoch"]) == list(range(len(m)))  # epoch 0 (the initial model) then one per accepted epoch
    assert (m["epoch"].diff().dropna() > 0).all()


def test_metrics_ranges(run):
    name, path, cfg, m = run
    for c in ("train_acc", "test_acc"):
        assert m[c].between(0, 1).all()
    # accuracies are counts over the split
    assert np.allclose(m["train_acc"] * N_TRAIN, (m["train_acc"] * N_TRAIN).round())
    assert np.allclose(m["test_acc"] * N_TEST, (m["test_acc"] * N_TEST).round())
    assert m["beta"].between(-1 - 1e-9, 1 + 1e-9).all()
    assert (m["rho"] > 0).all() and (m["norm_product"] > 0).all()
    support = m[[f"support_{k}" for k in range(1, 8)]].to_numpy()
    assert (support >= 1).all() and (support <= N_TRAIN).all()
    assert (np.diff(support, axis=1) >= 0).all()  # nested bands around q_min
    assert (m["rollbacks"] >= 0).all() and (m["rollbacks"] == m["rollbacks"].round()).all()
    assert (m["grad_evals"].diff().dropna() >= PASSES).all()
    assert m["grad_evals"].iloc[0] == 0
    assert (m["seconds"].diff().dropna() >= 0).all()
    # the model is still far from separable at epoch 0 and learns something
    assert m["train_acc"].iloc[-1] > m["train_acc"].iloc[0]
    assert m["log10_loss"].iloc[-1] < m["log10_loss"].iloc[0]


def test_margin_identities(run):
    name, path, cfg, m = run
    orders = MODELS[RUNS[name][1]][1]
    L = sum(orders)
    rho_i = m[[f"rho_{i}" for i in range(1, len(orders) + 1)]].to_numpy()
    assert np.allclose(m["rho"], np.sqrt((rho_i ** 2).sum(1)), rtol=1e-12, atol=0)
    assert np.allclose(m["normalized_margin"], m["q_min"] / m["rho"] ** L, rtol=1e-9, atol=0)
    assert np.allclose(m["norm_product"], np.prod(rho_i ** np.array(orders), axis=1), rtol=1e-9, atol=0)
    assert np.allclose(m["normalized_margin_layerwise"], m["q_min"] / m["norm_product"], rtol=1e-9, atol=0)
    # q_min > 0 exactly when every training point is classified correctly
    assert ((m["q_min"] > 0) == (m["train_acc"] == 1)).all()


def test_smoothed_margin_below_normalized_once_separated(runs):
    path, cfg = runs["loss-based"]
    m = pd.read_csv(path / "metrics.csv")
    separated = m[m["train_acc"] == 1]
    assert len(separated), "the loss-based run should separate its 100 digits within 12 epochs"
    assert (separated["smoothed_normalized_margin"] <= separated["normalized_margin"] * (1 + 1e-12)).all()
    for _, df in ((n, pd.read_csv(p / "metrics.csv")) for n, (p, _) in runs.items()):
        sep = df[df["train_acc"] == 1]
        assert (sep["smoothed_normalized_margin"] <= sep["normalized_margin"] * (1 + 1e-12)).all()


@pytest.mark.parametrize("name", ["loss-based", OURS])
def test_rejecting_schedules_log_strictly_decreasing_loss(runs, name):
    m = pd.read_csv(runs[name][0] / "metrics.csv")
    assert (m["log10_loss"].diff().dropna() < 0).all()
    if name == "loss-based":
        assert m["rollbacks"].sum() > 0, "the tiny run should reject some passes (else this test checks little)"
    # the accepted pass is a full pass; each rejected one took at least one step (a full pass unless it failed)
    steps, back = m["grad_evals"].diff().iloc[1:], m["rollbacks"].iloc[1:]
    assert (steps <= (back + 1) * PASSES).all() and (steps >= back + PASSES).all()


def test_constant_schedule_never_rolls_back(runs):
    m = pd.read_csv(runs["constant"][0] / "metrics.csv")
    cfg = runs["constant"][1]
    assert (m["rollbacks"] == 0).all()
    assert (m["alpha"] == cfg.train.lr).all()
    assert np.allclose(m["lr_log10"], math.log10(cfg.train.lr), rtol=0, atol=1e-12)
    assert (m["grad_evals"].diff().dropna() == PASSES).all()
    # the constant step is taken whether or not it lowers the loss: this run's loss goes up at least once
    assert (m["log10_loss"].diff().dropna() > 0).any()


def test_loss_based_alpha_rule(runs):
    path, cfg = runs["loss-based"]
    m = pd.read_csv(path / "metrics.csv")
    t = cfg.train
    assert m["alpha"].iloc[0] == pytest.approx(t.alpha0, rel=1e-15)
    # an accepted epoch multiplies alpha by r_up, each rejected pass before it divides alpha by r_down
    expected = m["alpha"].shift(1) * t.r_up / t.r_down ** m["rollbacks"]
    assert np.allclose(m["alpha"].iloc[1:], expected.iloc[1:], rtol=1e-12, atol=0)
    # the logged learning rate is alpha over the mean training loss of that row
    assert np.allclose(m["lr_log10"], np.log10(m["alpha"]) - m["log10_loss"], rtol=0, atol=1e-9)
    assert (m["rollbacks"] > 1).any()


def _recompute(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, orders: list[int]) -> dict[str, float]:
    """The logged quantities recomputed with plain float64 arithmetic, independent of robustmargin.losses."""
    with torch.no_grad():
        z = model(x).double()
    true = z.gather(1, y[:, None]).squeeze(1)
    per_sample = torch.logsumexp(z, 1) - true  # cross-entropy, ℓ_n
    q = true - z.scatter(1, y[:, None], -math.inf).amax(1)
    groups: dict[str, float] = {}
    for key, p in model.state_dict().items():
        layer = key.rsplit(".", 1)[0]
        groups[layer] = groups.get(layer, 0.0) + float(p.double().square().sum())
    rho_i = [math.sqrt(v) for v in groups.values()]
    rho = math.sqrt(sum(r * r for r in rho_i))
    L = sum(orders)
    S = float(per_sample.sum())
    return {"log10_loss": math.log10(float(per_sample.mean())), "train_acc": float((q > 0).double().mean()),
            "q_min": float(q.min()), "rho": rho, "normalized_margin": float(q.min()) / rho ** L,
            "normalized_margin_layerwise": float(q.min()) / math.prod(r ** a for r, a in zip(rho_i, orders)),
            "smoothed_normalized_margin": -math.log(math.expm1(S)) / rho ** L,
            **{f"rho_{i + 1}": r for i, r in enumerate(rho_i)}}


def test_logged_values_match_checkpoints(run):
    name, path, cfg, m = run
    orders = MODELS[RUNS[name][1]][1]
    x, y = load_split(path, "train")
    assert len(y) == N_TRAIN
    index = pd.read_csv(path / "checkpoints" / "index.csv")
    assert "final" in set(index["name"])
    for _, entry in index.iterrows():
        model, meta = load_checkpoint(path / "checkpoints" / entry["file"])
        row = m[m["epoch"] == entry["epoch"]].iloc[0]
        got = _recompute(model, x, y, orders)
        for key, value in got.items():
            assert row[key] == pytest.approx(value, rel=1e-6, abs=1e-12), (entry["name"], key)
        assert entry["log10_loss"] == pytest.approx(row["log10_loss"], rel=1e-12)
    assert index.set_index("name").loc["final", "epoch"] == m["epoch"].iloc[-1]


def test_test_split_metrics_match_checkpoint(runs):
    path, cfg = runs["loss-based"]
    m = pd.read_csv(path / "metrics.csv")
    x, y = load_split(path, "test")
    assert len(y) == N_TEST
    model, _ = load_checkpoint(path / "checkpoints" / "final.pt")
    with torch.no_grad():
        z = model(x).double()
    acc = float((z.argmax(1) == y).double().mean())
    loss = float((torch.logsumexp(z, 1) - z.gather(1, y[:, None]).squeeze(1)).mean())
    assert m["test_acc"].iloc[-1] == pytest.approx(acc, abs=1e-12)
    assert m["test_log10_loss"].iloc[-1] == pytest.approx(math.log10(loss), rel=1e-6)


def same_experiment(a: Config, b: Config) -> bool:
    """Equal configs up to the spelling of data.root (a run directory may store it resolved)."""
    da, db = a.to_dict(), b.to_dict()
    ra, rb = da["data"].pop("root"), db["data"].pop("root")
    return da == db and Path(ra).resolve() == Path(rb).resolve()


def test_config_toml_is_the_resolved_config(runs):
    for path, cfg in runs.values():
        saved = load_config(path / "config.toml")
        assert same_experiment(saved, cfg)
        assert Path(saved.data.root).resolve() == Path(cfg.data.root).resolve()


def test_stop_at_target_loss(tmp_path):
    cfg = tiny(stop_log10_loss=-0.5, thresholds=[-1.0])
    train(cfg, tmp_path / "run")
    m = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert m["log10_loss"].iloc[-1] < -0.5
    assert (m["log10_loss"].iloc[:-1] >= -0.5).all()  # stopped at the first row below the target
    index = pd.read_csv(tmp_path / "run" / "checkpoints" / "index.csv")
    assert list(index["name"]) == ["final"]
    assert index["epoch"].iloc[0] == m["epoch"].iloc[-1]


# --- resume -----------------------------------------------------------------------------------------

RESUME_EPOCHS = 10


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted loss-based run of RESUME_EPOCHS epochs (with rollbacks in its last epochs)."""
    run = train(tiny(epochs=RESUME_EPOCHS), tmp_path_factory.mktemp("reference"))
    m = pd.read_csv(run / "metrics.csv")
    assert m["rollbacks"].sum() > 0
    return run


def assert_same_run(run: Path, ref: Path) -> None:
    assert [r["epoch"] for r in rows(run)] == [r["epoch"] for r in rows(ref)]
    assert without_seconds(rows(run)) == without_seconds(rows(ref))
    a, b = final_params(run), final_params(ref)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the same rows; the files' hashes may differ, as their metadata records each run's own config (epochs)
    index, ref_index = (pd.read_csv(r / "checkpoints" / "index.csv").drop(columns="sha256") for r in (run, ref))
    assert index.equals(ref_index)
    assert load_config(run / "config.toml") == load_config(ref / "config.toml")


def test_resume_after_shorter_run(tmp_path, reference):
    out = tmp_path / "run"
    train(tiny(epochs=RESUME_EPOCHS // 2), out)
    assert len(rows(out)) == RESUME_EPOCHS // 2 + 1
    train(tiny(epochs=RESUME_EPOCHS), out, resume=True)
    assert_same_run(out, reference)


def _passes_before_epoch(ref: Path, epoch: int) -> int:
    r = rows(ref)
    return int(r[epoch - 1]["grad_evals"]) // PASSES


@pytest.mark.parametrize("where", ["early", "amid-rollbacks"])
def test_resume_after_kill_inside_a_pass(tmp_path, monkeypatch, reference, where):
    m = pd.read_csv(reference / "metrics.csv")
    if where == "early":
        kill_at = 3
    else:  # the second pass of the first epoch that needed rollbacks: its first pass was rejected
        epoch = int(m.loc[m["rollbacks"] > 0, "epoch"].iloc[0])
        kill_at = _passes_before_epoch(reference, epoch) + 2
    calls = {"n": 0}
    original = train_mod.Trainer.sgd_pass

    def killing_pass(self):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise KeyboardInterrupt
        return original(self)

    out = tmp_path / "run"
    monkeypatch.setattr(train_mod.Trainer, "sgd_pass", killing_pass)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(epochs=RESUME_EPOCHS), out)
    monkeypatch.setattr(train_mod.Trainer, "sgd_pass", original)
    assert 1 <= len(rows(out)) < RESUME_EPOCHS + 1
    train(tiny(epochs=RESUME_EPOCHS), out, resume=True)
    assert_same_run(out, reference)


@pytest.mark.parametrize("kill_at_save", [1, 3, 8])
def test_resume_after_kill_between_metrics_row_and_state(tmp_path, monkeypatch, reference, kill_at_save):
    """A kill after the row (and any threshold checkpoint) was written but before state.pt was: the resumed
    run must drop that row and redo the epoch, not log it twice. Save 1 is epoch 0's, save 8 is epoch 7's,
    which crosses the -0.5 threshold in this run."""
    calls = {"n": 0}
    original = train_mod.Trainer.save_state

    def killing_save(self):
        calls["n"] += 1
        if calls["n"] == kill_at_save:
            raise KeyboardInterrupt
        return original(self)

    out = tmp_path / "run"
    monkeypatch.setattr(train_mod.Trainer, "save_state", killing_save)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(epochs=RESUME_EPOCHS), out)
    monkeypatch.setattr(train_mod.Trainer, "save_state", original)
    assert len(rows(out)) == kill_at_save  # the row of the killed epoch is on disk
    train(tiny(epochs=RESUME_EPOCHS), out, resume=True)
    assert_same_run(out, reference)


def test_resume_finished_run_changes_nothing(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    train(tiny(epochs=RESUME_EPOCHS), out, resume=True)
    assert_same_run(out, reference)


@pytest.mark.parametrize("key, value", [("train.alpha0", 0.2), ("train.lr", 0.5), ("data.n_train", 80),
                                        ("model.hidden", [16]), ("train.thresholds", [-2.0])])
def test_resume_with_other_config_names_the_key(tmp_path, reference, key, value):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "metrics.csv").read_bytes()
    other = with_overrides(tiny(epochs=RESUME_EPOCHS + 2), {key: value})
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        train(other, out, resume=True)
    assert (out / "metrics.csv").read_bytes() == before
    assert (out / "config.toml").read_bytes() == (reference / "config.toml").read_bytes()


def test_resume_from_another_working_directory(tmp_path, monkeypatch):
    """The same config (default, relative data.root) resumed from another cwd is the same experiment."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    monkeypatch.chdir(first)
    out = train(tiny(epochs=1), tmp_path / "run")
    monkeypatch.chdir(second)
    train(tiny(epochs=2), out, resume=True)
    assert [int(r["epoch"]) for r in rows(out)] == [0, 1, 2]


def test_resume_may_change_the_stopping_keys(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    free = {"train.epochs": RESUME_EPOCHS, "train.max_seconds": 1e6, "train.stop_log10_loss": -50.0}
    if "max_steps" in {f.name for f in dataclasses.fields(TrainConfig)}:
        free["train.max_steps"] = 10_000
    train(with_overrides(tiny(), free), out, resume=True)
    assert without_seconds(rows(out)) == without_seconds(rows(reference))
    assert load_config(out / "config.toml").train.stop_log10_loss == -50.0  # the config it ran under


def test_fresh_train_into_existing_run_is_refused(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="resume"):
        train(tiny(epochs=RESUME_EPOCHS), out)
    with pytest.raises(UserError):
        train(tiny(epochs=3, seed=5), out)  # another config too
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "empty", "text"])
def test_resume_from_corrupt_state_is_a_user_error(tmp_path, reference, corruption):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    state = out / "state.pt"
    data = state.read_bytes()
    state.write_bytes({"garbage": np.random.default_rng(0).bytes(4096), "truncated": data[: len(data) // 2],
                       "empty": b"", "text": b"not a torch file\n"}[corruption])
    with pytest.raises(UserError, match="state"):
        train(tiny(epochs=RESUME_EPOCHS + 1), out, resume=True)


def test_resume_device_may_change_but_cuda_needs_a_device(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="cuda"):
        train(with_overrides(tiny(epochs=RESUME_EPOCHS), {"train.device": "cuda"}), out, resume=True)


# --- defects found in review: each test failed before its fix ---------------------------------------

def test_resume_loads_the_state_on_the_cpu_whatever_the_device(tmp_path, reference):
    """On CUDA, map_location=device moved the CPU batch-order generator's state too, and set_state takes
    only a CPU byte tensor. `meta` stands in for a non-CPU device that exists on every machine."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    trainer = train_mod.Trainer(tiny(epochs=RESUME_EPOCHS), out, quiet=True)
    trainer.device = torch.device("meta")
    trainer.load_state()
    saved = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
    assert torch.equal(trainer.batches.get_state(), saved["batches"])
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name


def test_diverged_constant_run_ends_on_its_last_accepted_state(tmp_path):
    """A batch past the ceiling mid-pass stops the run; `final` must hold the weights whose loss was recorded."""
    out = train(tiny("constant", lr=0.5, batch_loss_ceiling=3.0, epochs=60), tmp_path / "run")
    m = pd.read_csv(out / "metrics.csv")
    assert m["epoch"].iloc[-1] < 60  # it diverged (the premise of this test)
    index = pd.read_csv(out / "checkpoints" / "index.csv").set_index("name")
    model, _ = load_checkpoint(out / "checkpoints" / "final.pt")
    x, y = load_split(out, "train")
    ev = train_mod.evaluate(model, x, y, "ce", 1000)
    assert index.loc["final", "epoch"] == m["epoch"].iloc[-1]
    assert math.isclose(train_mod.losses.log10(ev.log_mean), index.loc["final", "log10_loss"], rel_tol=1e-12)
    assert ev.accuracy == m["train_acc"].iloc[-1]
    # and resuming it continues from that accepted state, not from half a pass
    state = torch.load(out / "state.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state["model"][name]), name


def test_resume_keeps_the_rollback_count(tmp_path, reference):
    """Stopped by the step budget right after a rejected pass, the resumed run must still count it."""
    m = pd.read_csv(reference / "metrics.csv")
    epoch = int(m.loc[m["rollbacks"] > 0, "epoch"].iloc[0])
    steps = int(m.loc[m["epoch"] == epoch - 1, "grad_evals"].iloc[0]) + PASSES  # one rejected pass in
    out = tmp_path / "run"
    train(tiny(epochs=RESUME_EPOCHS, max_steps=steps), out)
    assert len(rows(out)) == epoch  # stopped between the rejected pass and the accepted one
    train(tiny(epochs=RESUME_EPOCHS), out, resume=True)
    assert_same_run(out, reference)


def test_normalized_lr_log10_is_the_mean_step_of_the_pass(tmp_path, monkeypatch):
    """lr_log10 = log10 of the mean of α/L_b over the accepted pass's steps, checked with mpmath."""
    import mpmath

    from robustmargin import schedules
    seen = []
    original = schedules.Normalized.objective

    def recording(self, log_batch, log_frame):
        seen.append(float(log_batch.detach()))
        return original(self, log_batch, log_frame)

    monkeypatch.setattr(schedules.Normalized, "objective", recording)
    cfg = tiny("normalized", epochs=4)
    m = pd.read_csv(train(cfg, tmp_path / "run") / "metrics.csv")
    for row in m.iloc[1:].itertuples():
        steps = seen[row.grad_evals - PASSES:row.grad_evals]  # the accepted pass is the last one
        alpha_used = mpmath.mpf(row.alpha) / mpmath.mpf(cfg.train.r_up)  # α grew after the pass was accepted
        mean_rate = alpha_used * mpmath.fsum(mpmath.exp(-mpmath.mpf(v)) for v in steps) / len(steps)
        assert math.isclose(row.lr_log10, float(mpmath.log10(mean_rate)), rel_tol=1e-12, abs_tol=1e-12)


# --- the pass without host reads -------------------------------------------------------------------

def reference_pass(tr) -> bool:
    """The pass as it was before: the batch loss read back at every step, an early return at the ceiling."""
    t = tr.cfg.train
    order = torch.randperm(len(tr.y), generator=tr.batches)
    for start in range(0, len(order), t.batch_size):
        idx = order[start:start + t.batch_size]
        tr.grad_evals += 1
        log_batch = train_mod.losses.log_mean(train_mod.losses.sample_log_losses(tr.model(tr.x[idx]), tr.y[idx],
                                                                                 t.loss))
        if not float(log_batch.detach()) - tr.log_frame <= math.log(t.batch_loss_ceiling):
            return False
        grads = torch.autograd.grad(tr.schedule.objective(log_batch, tr.log_frame), tr.params)
        with torch.no_grad():
            torch._foreach_add_(tr.params, grads, alpha=-tr.schedule.step_size(tr.log_frame))
    return True


@pytest.mark.parametrize("stop_early", [True, False], ids=["cpu-path", "device-path"])
@pytest.mark.parametrize("schedule,keys", [("constant", {"lr": 0.5, "batch_loss_ceiling": 1.5, "batch_size": 10}),
                                           ("loss-based", {}), ("normalized", {"alpha0": 0.5})])
def test_pass_without_host_reads_equals_the_reference_pass(tmp_path, schedule, keys, stop_early):
    """Same parameters bit for bit, same step count and decision, including a pass whose k-th batch (k > 1)
    passes the ceiling; on the device path the steps after it run but change nothing."""
    cfg = tiny(schedule, **keys)
    new, ref = (train_mod.Trainer(cfg, tmp_path / name, quiet=True) for name in ("new", "ref"))
    new.stop_early = stop_early
    steps_per_pass = math.ceil(N_TRAIN / cfg.train.batch_size)
    failed_mid_pass = False
    for _ in range(12):
        for tr in (new, ref):
            tr.log_frame = tr.evaluate_train().log_mean
        before = new.grad_evals
        ok_new, ok_ref = new.sgd_pass(), reference_pass(ref)
        assert (ok_new, new.grad_evals) == (ok_ref, ref.grad_evals)
        for a, b in zip(new.params, ref.params):
            assert torch.equal(a, b)
        if not ok_new:
            failed_mid_pass |= 1 < new.grad_evals - before < steps_per_pass
            break
    assert failed_mid_pass == (schedule == "constant")  # the large constant rate fails mid-pass


def test_compile_setting_chooses_the_step_forward():
    model = torch.nn.Linear(2, 2)
    assert train_mod.step_forward(model, torch.device("cpu"), "auto") is model       # auto: CUDA only
    assert train_mod.step_forward(model, torch.device("cuda"), "off") is model       # off is honoured
    assert train_mod.step_forward(model, torch.device("cuda"), "auto") is not model  # compiled (lazily)


def test_compiled_step_forward_equals_eager(tmp_path, monkeypatch):
    """The compiled path, run on the CPU through AOTAutograd without code generation, matches eager within
    float tolerance over whole passes (the last short batch included: 100 points, batches of 30)."""
    monkeypatch.setattr(train_mod, "COMPILE_OPTIONS", {"backend": "aot_eager", "dynamic": False})
    cfg = tiny("normalized", batch_size=30)
    eager, compiled = (train_mod.Trainer(cfg, tmp_path / name, quiet=True) for name in ("eager", "compiled"))
    compiled.forward = train_mod.step_forward(compiled.model, torch.device("cuda"), "auto")
    for _ in range(3):
        for tr in (eager, compiled):
            tr.log_frame = tr.evaluate_train().log_mean
            assert tr.sgd_pass()
    for a, b in zip(eager.params, compiled.params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


EXPENSIVE = ["test_acc", "test_log10_loss", "beta"] + [f"support_{k}" for k in range(1, 8)]


def test_metrics_every_k_epochs_leaves_empty_cells_never_stale_ones(tmp_path):
    every = train(tiny(epochs=RESUME_EPOCHS, metrics_every=3), tmp_path / "every3")
    full = train(tiny(epochs=RESUME_EPOCHS), tmp_path / "every1")
    index = pd.read_csv(every / "checkpoints" / "index.csv")
    threshold_epochs = set(index.loc[index["threshold_log10"].notna(), "epoch"])
    a, b = without_seconds(rows(every)), without_seconds(rows(full))
    assert len(a) == len(b) == RESUME_EPOCHS + 1
    for row_a, row_b in zip(a, b):
        epoch = int(row_a["epoch"])
        computed = epoch % 3 == 0 or epoch in threshold_epochs
        for key in row_b:
            if key in EXPENSIVE and not computed:
                assert row_a[key] == "", (epoch, key)
            else:  # exactly what the every-epoch run wrote
                assert row_a[key] == row_b[key], (epoch, key)
    assert any(r["beta"] == "" for r in a)  # the premise: some rows skipped the expensive part


def test_metrics_every_k_resumes_identically(tmp_path):
    ref = train(tiny(epochs=RESUME_EPOCHS, metrics_every=4), tmp_path / "ref")
    out = tmp_path / "run"
    train(tiny(epochs=RESUME_EPOCHS // 2, metrics_every=4), out)
    train(tiny(epochs=RESUME_EPOCHS, metrics_every=4), out, resume=True)
    assert_same_run(out, ref)


@pytest.mark.parametrize("keys, total", [({"epochs": 3}, 3), ({"epochs": 3, "stop_log10_loss": -50.0}, None),
                                         ({"epochs": 3, "max_steps": 2}, None)])
def test_progress_bar_promises_only_the_work_that_will_be_done(tmp_path, monkeypatch, keys, total):
    import importlib

    train_module = importlib.import_module("robustmargin.train")  # the module; the package's name is the function
    totals = []

    class Bar:
        def __init__(self, *args, total=None, **kwargs):
            totals.append(total)

        def update(self, *_):
            pass

        def set_postfix_str(self, *_):
            pass

        def close(self):
            pass

    monkeypatch.setattr(train_module, "tqdm", Bar)
    train(tiny(**keys), tmp_path / "run", quiet=False)
    assert totals == [total]
