"""Crafted metrics for the claims tests of analysis and report."""
from __future__ import annotations

import numpy as np
import pandas as pd

EPOCHS = np.arange(0, 21)


def crafted_metrics(*, separate_at: int = 5, margin_slope: float = 0.01, dips: tuple[int, ...] = (),
                    loss_per_epoch: float = -2.0, evals_per_epoch: int = 3) -> pd.DataFrame:
    """Metrics whose claims hold or fail as constructed: margins grow linearly after `separate_at`, the
    smoothed margin sits just below and dips by 1 % at the epochs in `dips`."""
    margin = -0.05 + margin_slope * EPOCHS
    smoothed = margin - 0.001
    for e in dips:
        smoothed[e] = smoothed[e - 1] * 0.99
    return pd.DataFrame({
        "epoch": EPOCHS, "log10_loss": loss_per_epoch * EPOCHS, "train_acc": np.where(EPOCHS >= separate_at, 1.0, 0.9),
        "test_acc": 0.95, "normalized_margin": margin, "normalized_margin_layerwise": 10 * margin,
        "smoothed_normalized_margin": smoothed, "grad_evals": evals_per_epoch * EPOCHS})
