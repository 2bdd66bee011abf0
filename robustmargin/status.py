"""What a run directory holds: each stage done, stale (its inputs changed since), partial (a killed or
unfinished stage; how much) or missing, plus the checkpoints and the attack settings it has results for.

Only files are read — no data, no models — so it is quick and safe while a stage runs. Staleness follows
content: attack results and tables record the SHA-256 of the checkpoint files (and of metrics.csv, and the
results view) they came from (robustmargin.rundir); the report follows file times.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import math

import pandas as pd

from robustmargin.errors import UserError
from robustmargin.rundir import (CONFIG, METRICS, STATE, AttackSettings, Run, Unit, part_path, read_index,
                                 read_view, requests)

STAGES = ("train", "attack", "analyze", "report")


def is_run(path: Path) -> bool:
    return (path / CONFIG).is_file()


def sweep_runs(path: Path) -> list[Path]:
    """The run directories of a sweep directory (DIR/runs/*/), in name order."""
    return sorted(p for p in (path / "runs").glob("*") if p.is_dir() and is_run(p))


def directory_status(path: str | Path) -> dict[str, Any]:
    """{"run": …} for a run directory, {"sweep": …, "runs": [...]} for a sweep; UserError for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} does not exist or is not a directory")
    if is_run(path):
        return run_status(path)
    runs = sweep_runs(path)
    if runs:
        return {"sweep": str(path), "runs": [run_status(r) for r in runs]}
    raise UserError(f"{path} is not a run directory (no config.toml) nor a sweep (no runs/*/config.toml)")


def run_status(run_dir: str | Path) -> dict[str, Any]:
    run = Run(run_dir)
    index, problem = _index(run)
    sets = attack_sets(run, index)
    stages = [_train(run, index), _attack(run, sets, problem), _analyze(run), _report(run)]
    return {"run": str(run.path), "stages": stages,
            "checkpoints": [] if index is None else [
                {"name": str(r.name), "epoch": int(r.epoch),
                 "log10_loss": float(r.log10_loss) if math.isfinite(r.log10_loss) else None,
                 "sha256": r.sha256, "file_present": bool(r.sha256)}
                for r in index.itertuples(index=False)],
            "attack_settings": sets}


def _stage(stage: str, state: str, detail: str) -> dict[str, str]:
    return {"stage": stage, "state": state, "detail": detail}


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.is_file() else None


def _index(run: Run) -> tuple[pd.DataFrame | None, str]:
    """The index with each file's current hash (empty where the file is missing), or None and why."""
    try:
        index = read_index(run.path)
    except UserError as err:
        return None, str(err)
    from robustmargin.rundir import file_sha256

    files = [run.path / "checkpoints" / f for f in index["file"]]
    return index.assign(sha256=[file_sha256(f) if f.is_file() else "" for f in files]), ""


# --------------------------------------------------------------------------- stages


def _train(run: Run, index: pd.DataFrame | None) -> dict[str, str]:
    if not run.has_history:
        return _stage("train", "done", f"a user's model ({run.record.model}), not trained here")
    metrics = run.path / METRICS
    if not metrics.is_file():
        return _stage("train", "missing", "no metrics.csv")
    try:
        last = pd.read_csv(metrics, usecols=["epoch", "log10_loss"]).iloc[-1]
        epoch, loss = int(last["epoch"]), float(last["log10_loss"])
    except (ValueError, IndexError, KeyError, TypeError):
        return _stage("train", "partial", "metrics.csv has no complete row; `train --resume` starts again")
    final = None if index is None else index[index["name"] == "final"]
    if final is None or final.empty or int(final["epoch"].iloc[-1]) != epoch:
        return _stage("train", "partial", f"stopped at epoch {epoch} (log10 loss {loss:.4g}) without its final "
                                          f"checkpoint; `train --resume` continues")
    config, state = _mtime(run.path / CONFIG), _mtime(run.path / STATE)
    if config is not None and state is not None and config > state:
        return _stage("train", "stale", "config.toml changed after training; `train --resume` applies it")
    return _stage("train", "done", f"{epoch} epochs, log10 loss {loss:.4g}")


def attack_sets(run: Run, index: pd.DataFrame | None) -> list[dict[str, Any]]:
    """Every settings set ever asked for on this run, the current one first, each with its state against
    the checkpoint files now on disk."""
    current = read_view(run.path / "robustness" / "current")
    current_id = current.id if current is not None else None
    records = requests(run.path)
    records.sort(key=lambda r: r["id"] != current_id)
    sets = []
    for record in records:
        out = {k: record.get(k) for k in ("id", "points", "attacks", "budget", "steps", "batch_size")}
        out["current"] = record["id"] == current_id
        try:
            sets.append({**out, **_set_state(run, record, index)})
        except (KeyError, TypeError, ValueError, AttributeError):
            sets.append({**out, "state": "partial", "detail": "its request record is damaged; rerun attack"})
    return sets


def _set_state(run: Run, record: dict[str, Any], index: pd.DataFrame | None) -> dict[str, Any]:
    """The state of one settings set: stale if a result it merged came from a checkpoint file that has
    changed (retrained, removed), partial if batches asked for are missing or finished ones were not merged,
    else done."""
    settings = AttackSettings.from_dict(record)
    now = {} if index is None else dict(zip(index["name"], index["sha256"]))
    view = read_view(run.path / "robustness" / "settings" / settings.id)
    merged = set() if view is None else {(c, s, sha) for c, s, sha in view.pairs()}
    stale = sorted({c for c, _, sha in merged if now.get(c) != sha or not sha})
    wanted = [(r["checkpoint"], r["split"]) for r in record.get("requested", []) if r["checkpoint"] in now]
    done = total = 0
    finished = []
    for ckpt, split in wanted:
        units = [Unit(ckpt, now[ckpt], split, a, start, size) for a in settings.attacks
                 for start, size in settings.batches()]
        present = sum(part_path(run.path, u, settings).is_file() for u in units)
        done, total = done + present, total + len(units)
        if present == len(units):
            finished.append((ckpt, split))
    fresh = {(c, s) for c, s, sha in merged if c not in stale}
    if stale:
        state = "stale"
        detail = (f"{', '.join(stale)} changed since attacked; refresh with "
                  f"`{settings.command(run.path, stale)}`")
    elif done < total:
        state, detail = "partial", f"{done} of {total} batches"
    elif not set(finished) <= fresh:
        state, detail = "partial", f"all {total} batches finished but not merged; rerun attack"
    else:
        state, detail = "done", f"{len(fresh)} (checkpoint, split) result{'' if len(fresh) == 1 else 's'}"
    return {"results": sorted(f"{c} {s}" for c, s in fresh), "stale_results": stale, "batches_done": done,
            "batches": total, "state": state, "detail": detail}


def _attack(run: Run, sets: list[dict[str, Any]], problem: str) -> dict[str, str]:
    if problem:
        return _stage("attack", "partial", problem)
    if not sets:
        if any((run.path / "robustness" / "parts").glob("*/*/*/*.csv")):
            return _stage("attack", "partial", "batches under robustness/parts, none merged; rerun attack")
        return _stage("attack", "missing", "no attack results")
    s = sets[0]
    what = f"settings {s['id']}: n={s['points']}, {'+'.join(s['attacks'] or [])}, {s['budget']} budget"
    return _stage("attack", s["state"], f"{s['detail']} ({what})")


def _analyze(run: Run) -> dict[str, str]:
    state, detail = run.tables_state()
    if state in ("partial", "stale"):
        detail = f"{detail}; rerun analyze"
    return _stage("analyze", state, detail)


def _report(run: Run) -> dict[str, str]:
    run_dir = run.path
    report = _mtime(run_dir / "report.html")
    figures = sorted(run_dir.glob("figures/*.png"))
    if report is None:
        if figures:
            return _stage("report", "partial", f"{len(figures)} figures drawn, no report.html; rerun report")
        return _stage("report", "missing", "no report.html")
    if any(p.stat().st_mtime > report for p in figures):
        return _stage("report", "partial", "figures newer than report.html; rerun report")
    inputs = [run_dir / "metrics.csv", *sorted(run_dir.glob("tables/*.csv")), run_dir / "tables" / "provenance.json"]
    changed = [str(p.relative_to(run_dir)) for p in inputs if (_mtime(p) or 0) > report]
    if changed:
        return _stage("report", "stale", f"{', '.join(changed[:3])}{' …' if len(changed) > 3 else ''} "
                                         f"changed after report.html")
    if run.tables_state()[0] == "stale":
        return _stage("report", "stale", "its tables are stale; rerun analyze, then report")
    return _stage("report", "done", "report.html")


# --------------------------------------------------------------------------- text


def _checkpoint_text(c: dict[str, Any]) -> str:
    loss = "" if c["log10_loss"] is None else f", log10 loss {c['log10_loss']:.4g}"
    return f"{c['name']} (epoch {c['epoch']}{loss}{'' if c['file_present'] else ', file missing'})"


def format_status(status: dict[str, Any]) -> str:
    if "sweep" in status:
        return "\n".join([f"sweep {status['sweep']}: {len(status['runs'])} runs"]
                         + [format_status(r) for r in status["runs"]])
    lines = [f"run {status['run']}"]
    lines += [f"  {s['stage']:<8} {s['state']:<8} {s['detail']}" for s in status["stages"]]
    ckpts = ", ".join(_checkpoint_text(c) for c in status["checkpoints"])
    lines.append(f"  checkpoints: {ckpts or 'none'}")
    for s in status["attack_settings"]:
        steps = "" if s["steps"] is None else f", steps {s['steps']}"
        lines.append(f"  attack settings {s['id']}{' (current)' if s['current'] else ''}: n={s['points']}, "
                     f"{'+'.join(s['attacks'] or [])}, {s['budget']} budget{steps}, batch {s['batch_size']}: "
                     f"{s['state']}, {s['detail']}")
    return "\n".join(lines)
