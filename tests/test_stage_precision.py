"""Every stage that works on a device sets its arithmetic first (robustmargin.device.configure: IEEE float32
and deterministic kernels on CUDA), the attack and analysis stages as training does."""
from __future__ import annotations

import robustmargin.analysis as analysis
import robustmargin.robustness as robustness
from crafted import crafted_metrics
from tinyrun import write_run


def test_attack_and_analyze_configure_their_device(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run")
    crafted_metrics().to_csv(run / "metrics.csv", index=False)
    calls = []
    monkeypatch.setattr(robustness, "configure_device", lambda d: calls.append(("attack", str(d))))
    monkeypatch.setattr(analysis, "configure_device", lambda d: calls.append(("analyze", str(d))))
    robustness.evaluate_run(run, n=4, attacks="ddn", steps=3, batch_size=4, progress=False)
    analysis.analyze_run(run, progress=False, kkt_k=5)
    assert calls == [("attack", "cpu"), ("analyze", "cpu")]
