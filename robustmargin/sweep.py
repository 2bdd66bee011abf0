"""Sweeps: one run directory per point of a grid over config keys, each taken through the usual stages.

SWEEP.toml is a normal config (or `preset = "NAME"` plus keys that override the preset's) with a [grid]
table of dotted config keys → lists of values. Every grid point's Config is built (and so checked) before
anything runs, and the sweep's own config is recorded in DIR/sweep.toml, so a rerun with the same file
finishes only what is missing and a different one is refused.

Under torchrun the runs still to do are dealt out over the ranks; each rank takes its runs one after
another as one-process jobs (`distributed.alone`): one GPU each (cuda:LOCAL_RANK) or its share of the CPU
cores. In one process the runs go one after another.
"""
from __future__ import annotations

import itertools
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import tomli_w

from robustmargin import distributed
from robustmargin.config import Config, config_from_dict, load_preset, read_text_file, with_overrides
from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write_text
from robustmargin.robustness import attack_settings, check_attack_plan
from robustmargin.status import STAGES, is_run, run_status

SWEEP_FILE = "sweep.toml"
DEFAULT_STAGES = ("train", "attack", "analyze")


@dataclass(frozen=True)
class Point:
    """One grid point: its run directory name, its grid values (dotted key → value) and its config."""

    name: str
    values: dict[str, Any]
    config: Config


@dataclass(frozen=True)
class Sweep:
    base: Config
    grid: dict[str, list[Any]]
    points: list[Point]

    def record(self) -> str:
        """The sweep's own config as DIR/sweep.toml holds it: the base config and the grid."""
        return tomli_w.dumps({"grid": self.grid, **self.base.to_dict()})


# --------------------------------------------------------------------------- reading the sweep file


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "inf" if value == math.inf else f"{value:g}"
    if isinstance(value, list):
        return "-".join(_value_text(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(value))


def point_name(values: dict[str, Any]) -> str:
    """`key=value,…` in grid order: readable, and safe as a directory name."""
    return ",".join(f"{key}={_value_text(value)}" for key, value in values.items())


def parse_sweep(text: str, source: str = "sweep config") -> Sweep:
    """The base config, grid and every grid point of a sweep file's text; UserError for anything wrong."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{source} is not valid TOML: {err}") from None
    grid = raw.pop("grid", None)
    if not isinstance(grid, dict) or not grid:
        raise UserError(f"{source} needs a [grid] table of dotted config keys → lists of values")
    preset = raw.pop("preset", None)
    if preset is not None:
        if not isinstance(preset, str):
            raise UserError(f"{source}: preset must be a preset name, got {preset!r}")
        merged = load_preset(preset).to_dict()
        for section, table in raw.items():
            if section in merged and isinstance(table, dict):
                merged[section].update(table)
            else:
                merged[section] = table
        raw = merged
    base = config_from_dict(raw)
    known = base.to_dict()
    for key, values in grid.items():
        section, _, name = key.partition(".")
        if section not in known or name not in known[section]:
            raise UserError(f"{source}: grid key {key!r} is not a config key (expected SECTION.KEY, "
                            f"e.g. train.seed)")
        if not isinstance(values, list):
            raise UserError(f"{source}: grid key {key!r} must hold a list of values, got {values!r}")
        if not values:
            raise UserError(f"{source}: grid key {key!r} has an empty list")
    points, seen = [], {}
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = point_name(values)
        try:
            cfg = with_overrides(base, values)
        except UserError as err:
            raise UserError(f"{source}: grid point {name}: {err}") from None
        if name in seen:
            raise UserError(f"{source}: grid points {seen[name]} and {values} get the same run name {name!r}")
        seen[name] = values
        points.append(Point(name, values, cfg))
    return Sweep(base, grid, points)


def read_sweep(path: str | Path) -> Sweep:
    return parse_sweep(read_text_file(path, "sweep config"), str(path))


def check_stages(stages: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The stages asked for, in the order they run; UserError for an unknown one."""
    names = [s.strip() for s in stages.split(",")] if isinstance(stages, str) else list(stages)
    names = [s for s in names if s]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise UserError(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}" if unknown
                        else f"no stages given; choose from {', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)


def claim_directory(out: Path, sweep: Sweep, *, write: bool = True) -> None:
    """Record the sweep in out/sweep.toml (with `write`), or check that the one recorded there is this same
    sweep."""
    record = out / SWEEP_FILE
    if is_run(out):
        raise UserError(f"{out} holds a run (config.toml), not a sweep; choose another --out")
    if record.is_file():
        if record.read_text(encoding="utf-8") != sweep.record():
            raise UserError(f"{out} holds another sweep (its {SWEEP_FILE} differs from this config); "
                            f"choose another --out")
        return
    if any((out / "runs").glob("*/config.toml")):
        raise UserError(f"{out} holds runs of another sweep (runs/ without {SWEEP_FILE}); choose another --out")
    if write:
        atomic_write_text(record, sweep.record())  # every rank writes the same text: no rank waits for another


def sweep_grid(out: str | Path) -> dict[str, list[Any]]:
    """The grid recorded in a sweep directory's sweep.toml."""
    record = Path(out) / SWEEP_FILE
    try:
        return tomllib.loads(record.read_text(encoding="utf-8")).get("grid", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise UserError(f"{record} is missing or not readable") from None


# --------------------------------------------------------------------------- running


def _stage_done(run_dir: Path, stage: str, n: int) -> bool:
    """Whether `stage` of a run is complete (robustmargin.status); the attack only under exactly the
    settings the sweep uses (their whole digest: points, attacks, options, batches)."""
    if not is_run(run_dir):
        return False
    status = run_status(run_dir)
    if stage == "attack":
        wanted = attack_settings(points=n).id
        current = next((s for s in status["attack_settings"] if s["current"]), None)
        return current is not None and current["id"] == wanted and current["state"] == "done"
    return next(s["state"] for s in status["stages"] if s["stage"] == stage) == "done"


def pending(run_dir: Path, stages: tuple[str, ...], n: int) -> list[str]:
    """The stages of a run still to do. A stage redone makes the later ones stale, which `run_point`
    finds when it checks each stage again right before it."""
    return [s for s in stages if not _stage_done(run_dir, s, n)]


def _stage_function(stage: str, point: Point, run_dir: Path, n: int, quiet: bool) -> Callable[[], Any]:
    from robustmargin.analysis import analyze_run
    from robustmargin.report import write_report
    from robustmargin.robustness import evaluate_run
    from robustmargin.train import train

    device = point.config.train.device
    return {"train": lambda: train(point.config, run_dir, resume=True, quiet=quiet),
            "attack": lambda: evaluate_run(run_dir, n=n, device=device, progress=not quiet),
            "analyze": lambda: analyze_run(run_dir, device=device, progress=not quiet),
            "report": lambda: write_report(run_dir)}[stage]


def run_point(point: Point, run_dir: Path, stages: tuple[str, ...], *, n: int, quiet: bool,
              say: Callable[[str], None]) -> list[str]:
    """Take one run through the stages not yet done; returns the stages it ran."""
    ran = []
    for stage in stages:
        if _stage_done(run_dir, stage, n):
            continue
        start = time.perf_counter()
        _stage_function(stage, point, run_dir, n, quiet)()
        ran.append(stage)
        say(f"{point.name}: {stage} done in {time.perf_counter() - start:.1f} s")
    return ran


def sweep(config: str | Path, out: str | Path, *, stages: str | tuple[str, ...] = DEFAULT_STAGES, n: int = 100,
          quiet: bool = True) -> dict[str, list[str]]:
    """Run every grid point of the sweep file `config` into out/runs/NAME; a rerun does only what is missing.

    Under torchrun the runs still to do are dealt out over the ranks. Returns {run name: stages run here}
    for this rank's runs.
    """
    spec, chosen, out = read_sweep(config), check_stages(stages), Path(out)
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    claim_directory(out, spec, write=False)
    if "attack" in chosen:  # before any run is trained, every run's attack must be possible
        for point in spec.points:
            check_attack_plan(point.config, n, device=point.config.train.device)
    claim_directory(out, spec)
    w = distributed.world()
    prefix = f"[sweep rank {w.rank}]" if w.size > 1 else "[sweep]"

    def say(message: str) -> None:
        if not quiet:
            print(f"{prefix} {message}", file=sys.stderr, flush=True)

    # every rank lists the runs still to do before any rank starts one, so all deal out the same list
    with distributed.group("cpu"):
        todo = [p for p in spec.points if pending(out / "runs" / p.name, chosen, n)]
        distributed.barrier()
    mine = distributed.deal(todo, w)
    say(f"{len(spec.points)} runs, {len(spec.points) - len(todo)} complete, {len(mine)} to do here")
    done: dict[str, list[str]] = {}
    for point in mine:
        with distributed.alone(point.config.train.device):
            done[point.name] = run_point(point, out / "runs" / point.name, chosen, n=n, quiet=quiet, say=say)
    return done
