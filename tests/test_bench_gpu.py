"""scripts/bench_gpu.py runs on the CPU at toy sizes and reports every figure it promises."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"


def test_small_run_reports_every_figure(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--points", "200", "--presets", "paper-mnist",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    entry = json.loads(proc.stdout)["paper-mnist"]
    for schedule in ("loss-based", "normalized"):
        for path in ("auto", "off"):
            figures = entry[f"{schedule}/compile={path}"]
            assert figures["seconds_per_pass"] > 0 and figures["seconds_per_evaluation"] > 0
            assert figures["accepted_epochs"] >= 0 and figures["peak_memory_mib"] > 0
        assert entry[f"{schedule}/fast_path_speedup"] > 0
    for name in ("cw", "foolbox-cw"):
        assert entry["cw_reference"][name]["attacked"] >= 0
    assert all(p.is_relative_to(tmp_path) for p in tmp_path.rglob("*"))  # writes only under --out
