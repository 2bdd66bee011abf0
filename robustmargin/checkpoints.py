"""Checkpoint files (their index is robustmargin.rundir's). A checkpoint is a plain dict that loads with
`torch.load(path, weights_only=True)`: {"state_dict", "model" (the ModelSpec as a dict), "meta"}."""
from __future__ import annotations

from pathlib import Path

import torch

from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write
from robustmargin.models import HomogeneousNet, ModelSpec, build_model

def save_checkpoint(path: str | Path, model: HomogeneousNet, meta: dict) -> Path:
    payload = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "model": model.spec.as_dict(), "meta": meta}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def same_checkpoint(path: Path, model: HomogeneousNet, meta: dict) -> bool:
    """Whether `path` already holds exactly these weights and metadata (a resumed, finished run saves its
    final checkpoint again: the file, and so its identity, stays as it was)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing or damaged: write it
        return False
    state = model.state_dict()
    return (payload.get("meta") == meta and payload.get("model") == model.spec.as_dict()
            and set(payload["state_dict"]) == set(state)
            and all(torch.equal(payload["state_dict"][k], v.detach().cpu()) for k, v in state.items()))


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
