"""What a run directory holds: each stage done, stale (its inputs changed since), partial (a killed or
unfinished stage; how much) or missing, plus the checkpoints and the attack settings it has results for.

Only files are read — no data, no models — so it is instant and safe while a stage runs. Staleness of
`analyze` and `report` follows file times (as the report's own check does); staleness of `attack` follows
the checkpoints' identity (epoch, loss, file) recorded when the results were merged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from robustmargin.checkpoints import INDEX_COLUMNS
from robustmargin.errors import UserError
from robustmargin.robustness import SETTINGS_FILE, AttackSettings, part_path, read_record, work_units

STAGES = ("train", "attack", "analyze", "report")


def is_run(path: Path) -> bool:
    return (path / "config.toml").is_file()


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
    run_dir = Path(run_dir)
    index = _index(run_dir)
    sets = attack_sets(run_dir, index)
    stages = [_train(run_dir, index), _attack(run_dir, sets), _analyze(run_dir), _report(run_dir)]
    return {"run": str(run_dir), "stages": stages,
            "checkpoints": [] if index is None else [
                {"name": str(r.name), "epoch": int(r.epoch), "log10_loss": float(r.log10_loss),
                 "file_present": (run_dir / "checkpoints" / str(r.file)).is_file()}
                for r in index.itertuples(index=False)],
            "attack_settings": sets}


def _stage(stage: str, state: str, detail: str) -> dict[str, str]:
    return {"stage": stage, "state": state, "detail": detail}


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.is_file() else None


def _index(run_dir: Path) -> pd.DataFrame | None:
    path = run_dir / "checkpoints" / "index.csv"
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError):
        return None
    return frame if list(frame.columns) == INDEX_COLUMNS else None


# --------------------------------------------------------------------------- stages


def _train(run_dir: Path, index: pd.DataFrame | None) -> dict[str, str]:
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        return _stage("train", "missing", "no metrics.csv")
    try:
        last = pd.read_csv(metrics, usecols=["epoch", "log10_loss"]).iloc[-1]
    except (ValueError, IndexError, KeyError):
        return _stage("train", "partial", "metrics.csv has no complete row; `train --resume` starts again")
    epoch, loss = int(last["epoch"]), float(last["log10_loss"])
    final = None if index is None else index[index["name"] == "final"]
    if final is None or final.empty or int(final["epoch"].iloc[-1]) != epoch:
        return _stage("train", "partial", f"stopped at epoch {epoch} (log10 loss {loss:.4g}) without its final "
                                          f"checkpoint; `train --resume` continues")
    config, state = _mtime(run_dir / "config.toml"), _mtime(run_dir / "state.pt")
    if config is not None and state is not None and config > state:
        return _stage("train", "stale", "config.toml changed after training; `train --resume` applies it")
    return _stage("train", "done", f"{epoch} epochs, log10 loss {loss:.4g}")


def attack_sets(run_dir: Path, index: pd.DataFrame | None) -> list[dict[str, Any]]:
    """Every settings set recorded under robustness/settings/, the current one (robustness/settings.json)
    first, each with its state against the checkpoints now in the index."""
    folder = run_dir / "robustness" / "settings"
    current = read_record(run_dir / "robustness" / SETTINGS_FILE)
    records = [r for r in (read_record(p) for p in sorted(folder.glob(f"*/{SETTINGS_FILE}"),
                                                         key=lambda p: p.stat().st_mtime, reverse=True))
               if r is not None and "id" in r]
    current_id = current["id"] if current else (records[0]["id"] if records else None)
    records.sort(key=lambda r: r["id"] != current_id)
    sets = []
    for record in records:
        out = {k: record.get(k) for k in ("id", "points", "attacks", "budget", "steps", "batch_size")}
        out["current"] = record["id"] == current_id
        try:
            sets.append({**out, **_set_state(run_dir, record, index)})
        except (KeyError, TypeError, ValueError, AttributeError):
            sets.append({**out, "state": "partial", "detail": "its settings.json is damaged; rerun attack"})
    return sets


def _set_state(run_dir: Path, record: dict[str, Any], index: pd.DataFrame | None) -> dict[str, Any]:
    """The state of one settings set: stale if a checkpoint it merged has changed (retrained, removed),
    partial if batches asked for are missing or finished ones were not merged, else done."""
    settings = AttackSettings.from_dict(record)
    rows = {} if index is None else {str(r.name): r for r in index.itertuples(index=False)}
    now = {name: (int(r.epoch), float(r.log10_loss), str(r.file)) for name, r in rows.items()}
    stale = [r["checkpoint"] for r in record.get("results", [])
             if now.get(r["checkpoint"]) != (r["epoch"], r["log10_loss"], r["file"])]
    wanted = [(r["checkpoint"], r["split"]) for r in record.get("requested", []) if r["checkpoint"] in rows]
    done = total = 0
    finished = []
    for ckpt, split in wanted:
        units = work_units(index[index["name"] == ckpt], [split], settings)
        present = sum(part_path(run_dir, u, settings).is_file() for u in units)
        done, total = done + present, total + len(units)
        if present == len(units):
            finished.append((ckpt, split))
    merged = {(r["checkpoint"], r["split"]) for r in record.get("results", []) if r["checkpoint"] not in stale}
    if stale:
        state, detail = "stale", f"{', '.join(sorted(set(stale)))} changed since attacked; rerun attack"
    elif done < total:
        state, detail = "partial", f"{done} of {total} batches"
    elif not set(finished) <= merged:
        state, detail = "partial", f"all {total} batches finished but not merged; rerun attack"
    else:
        state, detail = "done", f"{len(merged)} (checkpoint, split) result{'' if len(merged) == 1 else 's'}"
    return {"results": sorted(f"{c} {s}" for c, s in merged), "batches_done": done, "batches": total,
            "state": state, "detail": detail}


def _attack(run_dir: Path, sets: list[dict[str, Any]]) -> dict[str, str]:
    robustness = run_dir / "robustness"
    if not sets:
        if (robustness / "distances.csv").is_file():
            return _stage("attack", "done", "distances.csv (its settings were not recorded)")
        if any((robustness / "parts").glob("*/*/*/*.csv")):
            return _stage("attack", "partial", "batches under robustness/parts, none merged; rerun attack")
        return _stage("attack", "missing", "no robustness/distances.csv")
    s = sets[0]
    what = f"settings {s['id']}: n={s['points']}, {'+'.join(s['attacks'] or [])}, {s['budget']} budget"
    return _stage("attack", s["state"], f"{s['detail']} ({what})")


def _analyze(run_dir: Path) -> dict[str, str]:
    table1, certified = _mtime(run_dir / "tables" / "table1.csv"), _mtime(run_dir / "robustness" / "certified.csv")
    if table1 is None:
        return _stage("analyze", "missing", "no tables/table1.csv")
    written = sorted(run_dir.glob("tables/*.csv"))
    if certified is None or certified < table1:
        return _stage("analyze", "partial", f"{len(written)} tables written, robustness/certified.csv "
                                            f"{'missing' if certified is None else 'older'}; rerun analyze")
    inputs = [run_dir / "metrics.csv", run_dir / "checkpoints" / "index.csv", run_dir / "robustness" / "distances.csv"]
    changed = [str(p.relative_to(run_dir)) for p in inputs if (_mtime(p) or 0) > table1]
    if changed:
        return _stage("analyze", "stale", f"{', '.join(changed)} changed after the tables")
    return _stage("analyze", "done", f"{len(written)} tables")


def _report(run_dir: Path) -> dict[str, str]:
    report = _mtime(run_dir / "report.html")
    figures = sorted(run_dir.glob("figures/*.png"))
    if report is None:
        if figures:
            return _stage("report", "partial", f"{len(figures)} figures drawn, no report.html; rerun report")
        return _stage("report", "missing", "no report.html")
    if any(p.stat().st_mtime > report for p in figures):
        return _stage("report", "partial", "figures newer than report.html; rerun report")
    inputs = [run_dir / "metrics.csv", *sorted(run_dir.glob("tables/*.csv")), run_dir / "robustness" / "distances.csv"]
    changed = [str(p.relative_to(run_dir)) for p in inputs if (_mtime(p) or 0) > report]
    if changed:
        return _stage("report", "stale", f"{', '.join(changed[:3])}{' …' if len(changed) > 3 else ''} "
                                         f"changed after report.html")
    return _stage("report", "done", "report.html")


# --------------------------------------------------------------------------- text


def format_status(status: dict[str, Any]) -> str:
    if "sweep" in status:
        return "\n".join([f"sweep {status['sweep']}: {len(status['runs'])} runs"]
                         + [format_status(r) for r in status["runs"]])
    lines = [f"run {status['run']}"]
    lines += [f"  {s['stage']:<8} {s['state']:<8} {s['detail']}" for s in status["stages"]]
    ckpts = ", ".join(f"{c['name']} (epoch {c['epoch']}, log10 loss {c['log10_loss']:.4g}"
                      f"{'' if c['file_present'] else ', file missing'})" for c in status["checkpoints"])
    lines.append(f"  checkpoints: {ckpts or 'none'}")
    for s in status["attack_settings"]:
        steps = "" if s["steps"] is None else f", steps {s['steps']}"
        lines.append(f"  attack settings {s['id']}{' (current)' if s['current'] else ''}: n={s['points']}, "
                     f"{'+'.join(s['attacks'] or [])}, {s['budget']} budget{steps}, batch {s['batch_size']}: "
                     f"{s['state']}, {s['detail']}")
    return "\n".join(lines)
