"""Checkpoint files and their index. A checkpoint is a plain dict that loads with
`torch.load(path, weights_only=True)`: {"state_dict", "model" (the ModelSpec as a dict), "meta"}."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write, atomic_write_csv
from robustmargin.models import HomogeneousNet, ModelSpec, build_model

INDEX_COLUMNS = ["name", "epoch", "log10_loss", "threshold_log10", "file"]


def save_checkpoint(path: str | Path, model: HomogeneousNet, meta: dict) -> Path:
    payload = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "model": model.spec.as_dict(), "meta": meta}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def spec_from_dict(d: dict) -> ModelSpec:
    return ModelSpec(**{**d, "hidden": tuple(d.get("hidden", ()))})


def load_checkpoint(path: str | Path) -> tuple[HomogeneousNet, dict]:
    """(model in eval mode on the CPU, metadata) from a checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(spec_from_dict(payload["model"]))
        model.load_state_dict(payload["state_dict"])
    except Exception as err:  # torch's loader raises many kinds on a damaged file; all mean the same here
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__})") from None
    return model.eval(), payload["meta"]


def index_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "index.csv"


def read_index(run_dir: str | Path, *, required: bool = True) -> pd.DataFrame:
    """The checkpoints of a run, in the order they were written."""
    path = index_path(run_dir)
    if not path.is_file():
        if required:
            raise UserError(f"{run_dir} has no checkpoints (no {path})")
        return pd.DataFrame(columns=INDEX_COLUMNS)
    frame = pd.read_csv(path)
    if list(frame.columns) != INDEX_COLUMNS:
        raise UserError(f"{path} is not a checkpoint index (columns {list(frame.columns)})")
    return frame


def write_index(run_dir: str | Path, frame: pd.DataFrame) -> None:
    atomic_write_csv(index_path(run_dir), frame[INDEX_COLUMNS])


def record_checkpoint(run_dir: str | Path, model: HomogeneousNet, *, name: str, epoch: int, log10_loss: float,
                      threshold_log10: float | None, meta: dict) -> None:
    """Save `checkpoints/NAME.pt` and put its row in the index (replacing one of the same name)."""
    file = f"{name}.pt"
    save_checkpoint(Path(run_dir) / "checkpoints" / file, model, {**meta, "name": name, "epoch": epoch})
    index = read_index(run_dir, required=False)
    row = pd.DataFrame([{"name": name, "epoch": epoch, "log10_loss": log10_loss,
                         "threshold_log10": threshold_log10, "file": file}])
    index = pd.concat([index[index["name"] != name], row], ignore_index=True) if len(index) else row
    write_index(run_dir, index)
