"""A user's PyTorch classifier: build it from a SPEC, load its weights, check its inputs and outputs, and
find whether it is homogeneous in its parameters (its Lipschitz bound is robustmargin.lipschitz.graph_bound). Nothing here reads or writes a run directory."""
from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from robustmargin.errors import UserError

HOMOGENEITY_SCALES = (2.0, 3.0)
HOMOGENEITY_RTOL = 1e-6


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of a module's state: names, dtypes, shapes and bytes of its tensors, in order."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        # reshape(-1) first: a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()



# ----------------------------------------------------------------------------- the user's model

def load_factory(spec: str) -> Callable[[], nn.Module]:
    """The callable named by `path/to/file.py:factory` or `package.module:factory`."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise UserError(f"model spec {spec!r} must be path/to/file.py:factory or package.module:factory")
    try:
        if where.endswith(".py") or Path(where).is_file():
            path = Path(where)
            if not path.is_file():
                raise UserError(f"model file {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"_robustmargin_model_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = _import_from_cwd(where)
    except UserError:
        raise
    except Exception as err:  # the user's code may raise anything while importing
        raise UserError(f"cannot import {where}: {type(err).__name__}: {err}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UserError(f"{where} has no callable {name!r}")
    return factory


def _import_from_cwd(name: str):
    """`import name` with the current directory searched first, as `python -m` would."""
    sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(Path.cwd()))


def build_module(spec: str) -> nn.Module:
    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as err:  # the user's factory may raise anything
        raise UserError(f"model factory {spec} failed: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict, or a robustmargin checkpoint's, into `model` (torch.load with weights_only=True).

    A robustmargin checkpoint's keys start with `body.`; they also fit a plain nn.Sequential."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds on a damaged or unsafe file
        raise UserError(f"cannot load weights {path} with weights_only=True ({type(err).__name__})") from None
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} holds no state dict")
    own = model.state_dict()
    if set(state) != set(own) and all(k.startswith("body.") for k in state):
        state = {k[len("body."):]: v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise UserError(f"weights {path} do not fit the model: {detail[:300]}") from None


def check_data(x: torch.Tensor, y: torch.Tensor, what: str = "data") -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise UserError(f"{what}: x and y must be tensors")
    if x.ndim != 4 or y.shape != (len(x),) or not len(x):
        raise UserError(f"{what}: x must be (N, C, H, W) and y (N,), got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if not x.is_floating_point() or y.is_floating_point() or y.dtype == torch.bool:
        raise UserError(f"{what}: x must be floating point and y integer labels")
    if not (bool(torch.isfinite(x).all()) and float(x.min()) >= 0 and float(x.max()) <= 1):
        raise UserError(f"{what}: x must lie in [0, 1]")


def check_outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Check that the model maps (n, C, H, W) to logits (n, classes); returns one-line warnings about
    outputs that work but mislead (probabilities instead of logits)."""
    xb = x[:64]
    param = next(iter(model.parameters()), None)
    try:
        with torch.no_grad():
            out = model(xb.to(param.device if param is not None else "cpu"))
    except Exception as err:  # the user's forward may raise anything on the wrong input shape
        raise UserError(f"the model fails on inputs of shape {tuple(xb.shape)}: {type(err).__name__}: {err}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(xb) or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"the model must return logits of shape (N, classes >= 2); got {shape} for N = {len(xb)}")
    if int(y.max()) >= out.shape[1] or int(y.min()) < 0:
        raise UserError(f"labels range over [{int(y.min())}, {int(y.max())}] but the model has {out.shape[1]} classes")
    out = out.double()
    if bool(((out >= 0) & (out <= 1)).all()) and bool(torch.allclose(out.sum(1), torch.ones(len(out), dtype=out.dtype),
                                                                      atol=1e-4)):
        return ["the model's outputs look like probabilities (in [0, 1], summing to 1): margins and Lipschitz "
                "figures then describe the softmax, not the logits"]
    return []


def homogeneity_order(model: nn.Module, x: torch.Tensor, *, scales: Sequence[float] = HOMOGENEITY_SCALES,
                      rtol: float = HOMOGENEITY_RTOL) -> int | None:
    """The integer L ≥ 1 with f(cθ) = c^L f(θ) for every c in `scales` (all parameters scaled, float64,
    relative tolerance rtol on the logits of `x`), or None when there is none."""
    net = copy.deepcopy(model).double().eval()
    x = x.double()
    with torch.no_grad():
        f0 = net(x)
        base = dict((k, v.clone()) for k, v in net.named_parameters())
        orders = set()
        for c in scales:
            for k, p in net.named_parameters():
                p.copy_(c * base[k])
            fc = net(x)
            if not (f0.norm() > 0 and fc.norm() > 0):
                return None
            order = round(math.log(float(fc.norm() / f0.norm())) / math.log(c))
            if order < 1 or float((fc - c ** order * f0).norm()) > rtol * float((c ** order * f0).norm()):
                return None
            orders.add(order)
    return orders.pop() if len(orders) == 1 else None


class Homogeneous(nn.Module):
    """A module with the order found numerically, in the interface the KKT code reads."""

    def __init__(self, inner: nn.Module, order: int):
        super().__init__()
        self.inner, self.order, self.is_homogeneous = inner, order, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


