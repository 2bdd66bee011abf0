"""Data-parallel training with two gloo ranks on the CPU equals training in one process."""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from robustmargin.config import config_from_dict
from robustmargin.train import train

EPOCHS = 20


TINY = {"data": {"name": "mnist5k", "n_train": 100, "n_test": 50},
        "model": {"name": "mlp", "hidden": [32], "bias": "none"},
        "train": {"schedule": "loss-based", "batch_size": 20, "thresholds": [-0.5, -1.0]}}


def tiny(epochs: int = EPOCHS, raw: dict = TINY):
    return config_from_dict({**raw, "train": {**raw["train"], "epochs": epochs}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, jobs: list[tuple[str, list[int], dict]]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        for out, epochs_per_launch, raw in jobs:  # one process group for every run: spawning is the slow part
            for i, epochs in enumerate(epochs_per_launch):
                train(tiny(epochs, raw), out, resume=i > 0)
    finally:
        torch.distributed.destroy_process_group()


FULL_BATCH = {**TINY, "train": {**TINY["train"], "batch_size": 100, "alpha0": 0.5, "r_up": 1.05}}
FIVE_STEPS = {**TINY, "train": {**TINY["train"], "batch_size": 20, "alpha0": 0.1, "r_up": 1.05}}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    """Two-rank runs: full-batch, five steps a pass, and five steps a pass stopped halfway and resumed."""
    root = tmp_path_factory.mktemp("ddp")
    jobs = [(str(root / "full"), [EPOCHS], FULL_BATCH), (str(root / "five"), [EPOCHS], FIVE_STEPS),
            (str(root / "parts"), [EPOCHS // 2, EPOCHS], FIVE_STEPS)]
    mp.spawn(_rank, args=(_free_port(), jobs), nprocs=2, join=True)
    return root


def compare(single: Path, ddp: Path, rel_tol: float) -> None:
    a, b = (pd.read_csv(run / "metrics.csv") for run in (single, ddp))
    assert len(a) == len(b) == EPOCHS + 1
    assert a["rollbacks"].sum() > 0  # the premise: rolled-back passes to agree on
    assert b["rollbacks"].tolist() == a["rollbacks"].tolist()
    assert b["grad_evals"].tolist() == a["grad_evals"].tolist()
    for x, y in zip(a["log10_loss"], b["log10_loss"]):
        assert math.isclose(x, y, rel_tol=rel_tol)
    index = [pd.read_csv(run / "checkpoints" / "index.csv") for run in (single, ddp)]
    assert index[0][["name", "epoch"]].equals(index[1][["name", "epoch"]])


def test_two_ranks_equal_one_process_full_batch(tmp_path, ddp):
    """One global batch per pass, sliced over the ranks."""
    compare(train(tiny(EPOCHS, FULL_BATCH), tmp_path / "single"), ddp / "full", rel_tol=1e-6)


def test_two_ranks_equal_one_process_five_steps_a_pass(tmp_path, ddp):
    """The same accepted and rolled-back passes; the loss agrees to float32 summation order (each rank sums
    its half of the batch gradient), which SGD at the edge of stability amplifies to ~1e-5 here."""
    compare(train(tiny(EPOCHS, FIVE_STEPS), tmp_path / "single"), ddp / "five", rel_tol=1e-4)


def test_two_ranks_resume_like_an_uninterrupted_run(ddp):
    a, b = (pd.read_csv(ddp / run / "metrics.csv").drop(columns="seconds") for run in ("five", "parts"))
    pd.testing.assert_frame_equal(a, b)
    for name in ("final.pt", "loss_1e-1.pt"):
        x, y = (torch.load(ddp / run / "checkpoints" / name, weights_only=True) for run in ("five", "parts"))
        for key in x["state_dict"]:
            assert torch.equal(x["state_dict"][key], y["state_dict"][key]), (name, key)
