"""One command for the whole study: train (with companion runs under other learning-rate schedules, for
the paper's Figure 1) → attack → analyze → report. Every stage resumes, so rerunning finishes the job."""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from robustmargin.analysis import analyze_run
from robustmargin.config import SCHEDULES, Config
from robustmargin.report import write_report
from robustmargin.errors import UserError
from robustmargin.robustness import check_attack_plan, evaluate_run
from robustmargin.theory import run_theory
from robustmargin.train import train


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"[reproduce] {message}", file=sys.stderr, flush=True)


def _ends(run_dir: Path) -> list[str]:
    """The first and the last checkpoint by epoch (one name if there is only one)."""
    from robustmargin.rundir import read_index

    names = list(read_index(run_dir).sort_values("epoch", kind="stable")["name"])
    return list(dict.fromkeys([names[0], names[-1]]))


def reproduce(cfg: Config, out: str | Path, *, companions: tuple[str, ...] | None = None,
              companion_seconds: float = 45.0, n: int = 500, every_checkpoint: bool = False,
              device: str = "cpu", quiet: bool = True) -> dict[str, float]:
    """Run every stage into `out`; companion runs (same config, other schedule, time-boxed) go to
    out/companions/SCHEDULE. The attack covers the first and the last checkpoint (the pair the robustness
    claim compares, so `n` can be large enough for a decisive interval), or every one if `every_checkpoint`.
    Returns the wall time of each stage in seconds."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    check_attack_plan(cfg, n, device=device)  # before any training
    if companions is None:
        companions = tuple(s for s in SCHEDULES if s != cfg.train.schedule)
    seconds: dict[str, float] = {}

    def stage(name: str, fn) -> None:
        _say(quiet, f"{name} ...")
        start = time.perf_counter()
        fn()
        seconds[name] = round(time.perf_counter() - start, 1)
        _say(quiet, f"{name} done in {seconds[name]:.1f} s")

    stage("train", lambda: train(cfg, out, resume=True, quiet=quiet))
    for schedule in companions:
        budget = min(cfg.train.max_seconds, companion_seconds)
        companion = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, schedule=schedule,
                                                                     max_seconds=budget))
        stage(f"train {schedule}", lambda c=companion, s=schedule: train(c, out / "companions" / s,
                                                                         resume=True, quiet=True))
    stage("attack", lambda: evaluate_run(out, n=n, device=device, progress=not quiet,
                                         checkpoints=None if every_checkpoint else _ends(out)))
    stage("analyze", lambda: analyze_run(out, device=device, progress=not quiet))
    # the quick theorem checks, once: they depend on no stage of the run
    stage("theory", lambda: (out / "theory" / "theory.csv").is_file()
          or run_theory(out / "theory", quick=True, progress=False))
    stage("report", lambda: write_report(out))
    _say(quiet, f"report: {out / 'report.html'}")
    return seconds
