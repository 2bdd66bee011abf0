"""scripts/bench_gpu.py runs on the CPU at toy sizes and reports every figure it promises."""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"
ROWS = ("fast_path=on", "fast_path=off", "fast_path=on/deterministic=false")


def bench(tmp_path: Path, *flags: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--points", "200", "--out", str(tmp_path), *flags],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(p.is_relative_to(tmp_path) for p in tmp_path.rglob("*"))  # writes only under --out
    return json.loads(proc.stdout)  # strict JSON: no Infinity or NaN


def test_small_run_reports_every_figure(tmp_path):
    report = bench(tmp_path, "--no-torchrun")
    entry = report["paper-mnist"]
    for row in ROWS:
        figures = entry["loss-based"][row]
        assert figures["seconds_per_pass"] > 0 and figures["seconds_per_evaluation"] > 0
        assert figures["accepted_epochs"] >= 0
        assert figures["repeated_pass_bit_identical"] is True  # the CPU's kernels are deterministic
        assert figures["peak_memory_mib"] is None  # measured per row on CUDA only
    assert entry["loss-based"]["fast_path_speedup"] > 0 and entry["loss-based"]["deterministic_cost"] > 0
    tf32 = entry["tf32_against_ieee"]
    assert tf32["applies"] is False and tf32["margin_max_abs_difference"] == 0  # no TF32 on the CPU
    for name in ("cw", "foolbox-cw"):
        assert entry["cw"][name]["attacked"] >= 0
    assert report["torchrun"] == {"skipped": "--no-torchrun"}


@pytest.mark.slow
def test_small_run_with_two_torchrun_ranks(tmp_path):
    run = bench(tmp_path)["torchrun"]
    assert run["returncode"] == 0 and run["ranks"] == 2 and run["backend"] == "gloo" and run["epochs"] == 2


def test_a_row_leaves_nothing_alive_for_the_next(tmp_path, monkeypatch):
    """Each row's peak is its own: once a row is done and released, its trainer, model and data are
    gone, compiled graphs included (compiled here on the CPU, as CUDA would)."""
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    train_mod = sys.modules["robustmargin.train"]  # the module: the package's `train` is the function
    monkeypatch.setattr(train_mod, "COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(train_mod, "COMPILE_OPTIONS", {"backend": "eager", "dynamic": False})
    alive = []

    class Watched(bench_gpu.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            alive.extend(weakref.ref(obj) for obj in (self, self.model, self.x))

    monkeypatch.setattr(bench_gpu, "Trainer", Watched)
    args = argparse.Namespace(epochs=1, small=True)
    cfg = bench_gpu.config("paper-mnist", args, torch.device("cpu"), schedule="loss-based")
    data = {"train": bench_gpu.synthetic(cfg.data.name, 150, torch.device("cpu")),
            "test": bench_gpu.synthetic(cfg.data.name, 10, torch.device("cpu"), 1)}
    row, state = bench_gpu.bench_row(cfg, data, tmp_path / "row", torch.device("cpu"))
    del data
    bench_gpu.release(torch.device("cpu"))
    gc.collect()
    assert len(alive) == 3 and all(ref() is None for ref in alive)
    assert row["seconds_per_pass"] > 0 and all(not t.requires_grad for t in state.values())
