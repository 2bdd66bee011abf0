"""A small run directory for the run-directory tests: two checkpoints of a bias-free MLP trained briefly
on embedded digits, without the training loop (fast, and independent of it)."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import robustmargin.data as data
from robustmargin.rundir import record_checkpoint
from robustmargin.config import config_from_dict
from robustmargin.models import ModelSpec, build_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"data": {"n_train": 200, "n_test": 100}, "model": {"name": "mlp", "bias": "none", "hidden": [32]}}


@functools.lru_cache(maxsize=1)
def _train_split():
    return data.load_data(config_from_dict(CONFIG).data)["train"]


def write_run(run: Path) -> Path:
    cfg = config_from_dict(CONFIG)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(cfg.to_toml())
    x, y = _train_split()
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="mlp", bias="none", hidden=(32,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    epoch = 0
    for until, name in ((2, "model-1"), (20, "model-2")):
        for epoch in range(epoch + 1, until + 1):
            for i in range(0, len(x), 50):
                opt.zero_grad()
                F.cross_entropy(model(x[i:i + 50]), y[i:i + 50]).backward()
                opt.step()
        record_checkpoint(run, model.eval(), name=name, epoch=epoch, log10_loss=-1.0 * epoch,
                          threshold_log10=None, meta={})
        model.train()
    return run


def robustmargin(*args: str, cwd: Path | None = None, torchrun: int = 0) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process (under torchrun with `torchrun` ranks), one thread per process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"]
    cmd = [*launcher, "-m", "robustmargin", *(["--"] if torchrun else []), *args]
    # two cores at most, so that each of two CPU ranks takes exactly one thread
    cores = sorted(os.sched_getaffinity(0))[:2] if hasattr(os, "sched_getaffinity") else None
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)


def write_results(run: Path, distances, *, settings_id: str | None = None) -> None:
    """Store attack distances built by a test as the run's current results view, as an attack would
    (with the checkpoints' hashes), so that analysis and the report read them."""
    from robustmargin.robustness import _result_texts
    from robustmargin.rundir import AttackSettings, Run, write_view

    attacks = tuple(dict.fromkeys(distances["attack"]))
    points = int(distances.groupby(["checkpoint", "split"])["index"].nunique().max())
    settings = AttackSettings(points, attacks, "fast", None, 100, {a: {} for a in attacks})
    texts = _result_texts(distances.assign(seconds=0.0, forwards=0, backwards=0), settings,
                          Run(run).checkpoints())
    if settings_id is not None:  # a chosen id, as a test that names it needs
        import json
        record = json.loads(texts["settings.json"])
        texts["settings.json"] = json.dumps({**record, "id": settings_id}, indent=1) + "\n"
    write_view(Path(run), settings_id or settings.id, texts)
