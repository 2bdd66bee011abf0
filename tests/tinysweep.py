"""A complete 2 × 2 sweep on tiny budgets (train, attack, analyze), made once per test session for the
sweep and compare tests; tests that change it work on a copy."""
from __future__ import annotations

from pathlib import Path

import pytest

from robustmargin.sweep import sweep

BASE = """
[data]
n_train = 100
n_test = 50
[model]
name = "mlp"
bias = "none"
hidden = [8]
[train]
batch_size = 50
max_steps = 20
"""
GRID = """
[grid]
"train.seed" = [0, 1]
"model.width" = [0.5, 1.0]
"""
NAMES = ["train.seed=0,model.width=0.5", "train.seed=0,model.width=1",
         "train.seed=1,model.width=0.5", "train.seed=1,model.width=1"]
N = 10


@pytest.fixture(scope="session")
def swept(tmp_path_factory) -> Path:
    """A complete 2 × 2 sweep (train, attack, analyze); tests copy it before changing it."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "sweep.toml").write_text(BASE + GRID)
    ran = sweep(root / "sweep.toml", root / "out", n=N)
    assert ran == {name: ["train", "attack", "analyze"] for name in NAMES}
    return root
