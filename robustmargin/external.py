"""Any PyTorch classifier as a run directory: load it, attack it, and analyze what applies to it.

The config.toml of such a run has an [external] table (the model SPEC, the SHA-256 of its weights and
the data; a named dataset adds the usual [data] table) and no [model] or [train]; `read_external` is its
loader, and `robustmargin.config.load_config` keeps reading only the runs that `train` writes.
The model's weights are copied to checkpoints/model.pt, listed in the index as checkpoint `model`.

What the analysis can say depends on the network:
- a Lipschitz bound and certified radii need a chain of Conv2d, Linear, ReLU, non-overlapping
  MaxPool2d/AvgPool2d and Flatten, found by tracing the module with torch.fx;
- normalized margins and KKT residuals need f(cθ) = c^L f(θ), checked numerically.
Whatever does not apply is left out with a one-line note (tables/notes.txt), never an error.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import tomli_w

from robustmargin.config import DATASETS, DataConfig
from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write, atomic_write_text

SUPPORTED = "Conv2d, Linear, ReLU, non-overlapping MaxPool2d/AvgPool2d and Flatten"
CHECKPOINT = "model"
LIVE_DATA = "data.npz"
HOMOGENEITY_SCALES = (2.0, 3.0)
HOMOGENEITY_RTOL = 1e-6
NOTES = Path("tables") / "notes.txt"

Split = tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- the run's record

@dataclass(frozen=True)
class ExternalRun:
    model: str            # SPEC ("file.py:factory" or "package.module:factory"), or "<live Class>"
    weights_sha256: str   # of the --weights file; without one, and for a live module, `state_sha256`
    data: str             # mnist5k | mnist | cifar10, or an .npz path (relative to the run directory)
    data_sha256: str = ""  # .npz only
    data_config: DataConfig | None = None  # named datasets only

    @property
    def live(self) -> bool:
        return self.model.startswith("<")


def read_external(run_dir: str | Path) -> ExternalRun | None:
    """The [external] table of RUN/config.toml, or None for a run that `train` wrote."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        return None
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None  # load_config reports it
    table = raw.get("external")
    if not isinstance(table, dict):
        return None
    try:
        data_config = DataConfig(**raw["data"]) if "data" in raw else None
        return ExternalRun(**table, data_config=data_config)
    except TypeError as err:
        raise UserError(f"{path}: bad [external] or [data] table ({err})") from None


def is_external(run_dir: str | Path) -> bool:
    return read_external(run_dir) is not None


def _write_config(run_dir: Path, ext: ExternalRun) -> None:
    raw = {"external": {"model": ext.model, "weights_sha256": ext.weights_sha256, "data": ext.data,
                        "data_sha256": ext.data_sha256}}
    if ext.data_config is not None:
        raw["data"] = dict(ext.data_config.__dict__)
    path = run_dir / "config.toml"
    text = tomli_w.dumps(raw)
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        raise UserError(f"{run_dir} already holds a different run; choose another --out")
    atomic_write_text(path, text)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of a module's state: names, dtypes, shapes and bytes of its tensors, in order."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def external_split(run_dir: str | Path, split: str) -> Split | None:
    """(x, y) of an external run's split, or None if `run_dir` is not an external run."""
    from robustmargin.data import load_data, load_npz

    ext = read_external(run_dir)
    if ext is None:
        return None
    if ext.data_config is not None:
        return load_data(ext.data_config)[split]
    if split != "test":
        raise UserError(f"{run_dir} evaluates an .npz file, which is its test split only")
    path = Path(run_dir) / ext.data  # an absolute ext.data stays as it is
    if not path.is_file() or file_sha256(path) != ext.data_sha256:
        raise UserError(f"data file {path} is missing or changed since the run was made (SHA-256 differs)")
    return load_npz(path)


def run_splits(run_dir: str | Path) -> tuple[str, ...]:
    ext = read_external(run_dir)
    return ("train", "test") if ext is None or ext.data_config is not None else ("test",)


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
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as err:  # the user's code may raise anything while importing
        raise UserError(f"cannot import {where}: {type(err).__name__}: {err}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UserError(f"{where} has no callable {name!r}")
    return factory


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


def check_outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """The number of classes, after checking the model maps (n, C, H, W) to logits (n, classes)."""
    xb, yb = x[:8], y[:8]
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
    return int(out.shape[1])


_LIVE: dict[Path, nn.Module] = {}  # modules handed to `evaluate`, by run directory, while it runs


@contextlib.contextmanager
def _live(run_dir: Path, model: nn.Module):
    _LIVE[run_dir.resolve()] = model
    try:
        yield
    finally:
        _LIVE.pop(run_dir.resolve(), None)


def run_model(run_dir: str | Path) -> nn.Module:
    """The external run's model, in eval mode, rebuilt from its SPEC and checkpoints/model.pt."""
    run_dir = Path(run_dir)
    if run_dir.resolve() in _LIVE:
        return _LIVE[run_dir.resolve()].eval()
    ext = read_external(run_dir)
    if ext is None:
        raise UserError(f"{run_dir} is not an external-model run")
    if ext.live:
        raise UserError(f"{run_dir} was made from a live module {ext.model}; rerun robustmargin.evaluate on it")
    model = build_module(ext.model)
    load_weights(model, run_dir / "checkpoints" / f"{CHECKPOINT}.pt")
    return model.eval()


def _record_model(run_dir: Path, model: nn.Module) -> Path:
    from robustmargin.checkpoints import write_index

    file = run_dir / "checkpoints" / f"{CHECKPOINT}.pt"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(file, lambda tmp: torch.save({"state_dict": state}, tmp))
    write_index(run_dir, pd.DataFrame([{"name": CHECKPOINT, "epoch": 0, "log10_loss": math.nan,
                                        "threshold_log10": math.nan, "file": file.name}]))
    return file


# ----------------------------------------------------------------------------- the attack stage

def attack_spec(spec: str, *, data: str, out: str | Path, weights: str | Path | None = None,
                split: str | None = None, n: int | None = None, data_root: str = "data", download: bool = False,
                **options) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`robustmargin attack --model SPEC`: build the run directory `out`, then attack as for any run.

    `options` go to robustness.evaluate_run (attacks, budget, steps, batch_size, device, progress)."""
    from robustmargin.data import load_data, load_npz
    from robustmargin.robustness import evaluate_run

    model = build_module(spec)
    if weights is not None:
        load_weights(model, weights)
    model.eval()
    if data in DATASETS:
        data_config = DataConfig(name=data, root=str(Path(data_root).resolve()), download=download)
        splits_data = load_data(data_config)
        ext_data, data_sha = data, ""
    elif data.endswith(".npz"):
        data_config = None
        x, y = load_npz(data)
        splits_data = {"test": (x, y)}
        ext_data, data_sha = str(Path(data).resolve()), file_sha256(data)
    else:
        raise UserError(f"--data must be one of {', '.join(DATASETS)} or an .npz file, got {data!r}")
    splits = tuple(splits_data) if split in (None, "both") else (split,)
    for s in splits:
        if s not in splits_data:
            raise UserError(f"the data {data} has no {s} split (an .npz file is the test split)")
        check_data(*splits_data[s], what=f"{data} {s}")
        check_outputs(model, *splits_data[s])
    if n is None:
        n = min(100, *(len(splits_data[s][1]) for s in splits))
    out = Path(out)
    sha = file_sha256(weights) if weights is not None else state_sha256(model)
    spec = _absolute_spec(spec)
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out, ExternalRun(model=spec, weights_sha256=sha, data=ext_data, data_sha256=data_sha,
                                   data_config=data_config))
    _record_model(out, model)
    return evaluate_run(out, splits=splits, n=n, **options)


def _absolute_spec(spec: str) -> str:
    where, _, name = spec.rpartition(":")
    return f"{Path(where).resolve()}:{name}" if where.endswith(".py") or Path(where).is_file() else spec


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, out: str | Path,
             attacks: Sequence[str] | str = "ensemble", budget: str = "fast", steps: int | None = None,
             batch_size: int = 100, device: str = "cpu", analyze: bool = True, report: bool = True,
             progress: bool = False) -> pd.DataFrame:
    """Minimal L2 distances of a live module on (x, y) as the test split of a new run directory `out`,
    followed (by default) by the analysis and the report, as `robustmargin attack --model` + `analyze` +
    `report` would do. Returns the distances (robustness/distances.csv)."""
    from robustmargin.robustness import evaluate_run

    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_data(x, y)
    x, y = x.detach().float().cpu(), y.detach().long().cpu()
    model.eval()
    check_outputs(model, x, y)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / LIVE_DATA
    if not (data_file.is_file() and _same_data(data_file, x, y)):  # a rerun keeps the file and its SHA-256
        atomic_write(data_file, lambda tmp: np.savez(open(tmp, "wb"), x=x.numpy(), y=y.numpy()))
    _write_config(out, ExternalRun(model=f"<live {type(model).__qualname__}>", weights_sha256=state_sha256(model),
                                   data=LIVE_DATA, data_sha256=file_sha256(data_file)))
    _record_model(out, model)
    with _live(out, model):
        distances, _ = evaluate_run(out, splits=("test",), n=len(x), attacks=attacks, budget=budget, steps=steps,
                                    batch_size=batch_size, device=device, progress=progress)
        if analyze or report:
            from robustmargin.analysis import analyze_run
            analyze_run(out, device=device, progress=progress)
        if report:
            from robustmargin.report import write_report
            write_report(out)
    return distances


def _same_data(path: Path, x: torch.Tensor, y: torch.Tensor) -> bool:
    from robustmargin.data import load_npz

    try:
        x0, y0 = load_npz(path)
    except UserError:
        return False
    return x0.shape == x.shape and y0.shape == y.shape and torch.equal(x0, x) and torch.equal(y0, y)


# ----------------------------------------------------------------------------- tracing

def _flatten_args(node, head) -> bool:
    """Whether a call flattens `head` to (N, -1): flatten(x, 1), x.view(x.size(0), -1), x.reshape(N, -1)."""
    target, args, kwargs = node.target, node.args, node.kwargs
    if target in (torch.flatten, "flatten"):
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if target in ("view", "reshape", torch.reshape):
        shape = args[1:] if target != torch.reshape else args[1]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        if len(shape) != 2 or shape[1] != -1:
            return False
        first = shape[0]
        return (getattr(first, "op", None) == "call_method" and first.target == "size" and first.args[0] is head
                and (first.args[1:] == (0,) or first.kwargs.get("dim") == 0))
    return False


def _pool_from_call(node) -> nn.Module | None:
    names = ("kernel_size", "stride", "padding")
    if node.target in (F.max_pool2d, torch.max_pool2d):
        params = dict(zip(names + ("dilation", "ceil_mode"), node.args[1:]), **node.kwargs)
        return None if params.get("return_indices") else nn.MaxPool2d(**params)
    if node.target in (F.avg_pool2d, torch._C._nn.avg_pool2d):
        return nn.AvgPool2d(**dict(zip(names + ("ceil_mode", "count_include_pad", "divisor_override"),
                                       node.args[1:]), **node.kwargs))
    return None


def trace_chain(model: nn.Module) -> tuple[list[nn.Module] | None, str]:
    """The module as a chain of supported layers (sharing its parameters), or None and why not."""
    from torch import fx

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # torch.fx refuses data-dependent control flow and more
        return None, f"torch.fx cannot trace the module ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    modules = dict(model.named_modules())
    layers: list[nn.Module] = []
    head = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if head is not None:
                return None, "the module takes more than one input"
            head = node
            continue
        if node.op == "output":
            if node.args[0] is not head:
                return None, "the module's output is not the end of a single chain of layers"
            break
        if node.op == "call_method" and node.target == "size" and node.args[0] is head:
            continue  # part of x.view(x.size(0), -1)
        inputs = [a for a in node.all_input_nodes if not (a.op == "call_method" and a.target == "size")]
        if inputs != [head]:
            return None, f"{node.name} is not part of a single chain of layers (branches and skips are not supported)"
        layer = None
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d)):
                layer = m
            elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
                layer = m
            what = type(m).__name__
        elif node.op in ("call_function", "call_method"):
            if node.target in (torch.relu, F.relu, "relu", torch.relu_, "relu_"):
                layer = nn.ReLU()
            elif _flatten_args(node, head):
                layer = nn.Flatten()
            else:
                layer = _pool_from_call(node) if node.op == "call_function" else None
            what = getattr(node.target, "__name__", str(node.target))
        else:
            what = node.op
        if layer is None:
            return None, f"unsupported operation {what} (supported: {SUPPORTED})"
        layers.append(layer)
        head = node
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in layers):
        return None, "the module has no Conv2d or Linear layer"
    return layers, ""


def traced_net(model: nn.Module, x: torch.Tensor, num_classes: int):
    """A HomogeneousNet view of `model` (same parameters) for the Lipschitz code, or None and why not.

    The chain must reproduce the module's logits on `x`, and its maps between layers must be 1-Lipschitz."""
    from robustmargin.lipschitz import check_one_lipschitz_between_layers
    from robustmargin.models import HomogeneousNet, ModelSpec

    layers, reason = trace_chain(model)
    if layers is None:
        return None, reason
    c, h, w = x.shape[1:]
    net = HomogeneousNet(layers, ModelSpec(name="external", bias="all", activation="relu", in_channels=c,
                                           image_size=h, num_classes=num_classes)).eval()
    net.input_shape = (c, h, w)
    try:
        check_one_lipschitz_between_layers(net)
    except UserError as err:
        return None, str(err)
    with torch.no_grad():
        same = torch.allclose(net(x), model(x), rtol=1e-5, atol=1e-6)
    if not same:
        return None, "the traced chain of layers does not reproduce the module's outputs"
    return net, ""


# ----------------------------------------------------------------------------- homogeneity

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


class _Homogeneous(nn.Module):
    """A module with the order found numerically, in the interface the KKT code reads."""

    def __init__(self, inner: nn.Module, order: int):
        super().__init__()
        self.inner, self.order, self.is_homogeneous = inner, order, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


# ----------------------------------------------------------------------------- the analysis stage

def analyze_external(run_dir: str | Path, *, device: str = "cpu", kkt_k: int = 100, progress: bool = True,
                     write: bool = True):
    """analysis.analyze_run for an external run: the same tables, with what does not apply left out."""
    from robustmargin import analysis as A
    from robustmargin import kkt, lipschitz
    from robustmargin.data import load_split
    from robustmargin.losses import log_sum, sample_log_losses
    from robustmargin.margins import sample_margins, smoothed_normalized_margin
    from robustmargin.models import parameter_norms

    run_dir = Path(run_dir)
    model = run_model(run_dir).to(device)
    data = {s: tuple(t.to(device) for t in load_split(run_dir, s)) for s in run_splits(run_dir)}
    distances = A.read_distances(run_dir)
    if distances is not None:
        unknown = sorted(set(distances["checkpoint"]) - {CHECKPOINT})
        if unknown:
            raise UserError(f"robustness/distances.csv names checkpoints not in the index: {', '.join(unknown)}")
        A._check_labels(distances, data)
    notes: list[str] = []
    x_probe = next(iter(data.values()))[0][:64]
    with torch.no_grad():
        num_classes = model(x_probe[:1]).shape[1]
    net, why = traced_net(model, x_probe, num_classes)
    order = homogeneity_order(model, x_probe)
    if net is None:
        notes.append(f"Lipschitz bound and certified radii left out: {why}.")
    if order is None:
        notes.append("normalized margins and KKT residuals left out: f(cθ) ≠ c^L f(θ) numerically "
                     "(the model is not homogeneous in its parameters).")

    sigmas = [float(s) for s in lipschitz.layer_spectral_norms(net)] if net is not None else []
    certifiable = net is not None and isinstance(net.body[-1], nn.Linear)
    if net is not None and not certifiable:
        notes.append("certified radii left out: they need a network that ends with its Linear last layer.")
    splits = {}
    for split, (x, y) in data.items():
        logits = A._logits(model, x)
        idx = A._eval_indices(distances, CHECKPOINT, split, len(y))
        radii = None
        if certifiable:
            at = torch.as_tensor(idx, device=x.device)
            radii = np.clip(lipschitz.certified_radii(net, x[at], y[at], sigmas=sigmas).cpu().numpy(), 0, None)
        splits[split] = A.SplitStats(margins=sample_margins(logits, y.cpu()).numpy(),
                                     log_sum_loss=float(log_sum(sample_log_losses(logits, y.cpu(), "ce"))),
                                     eval_index=idx, radii=radii)
    kkt_result = None
    if order is not None:
        if "train" not in splits:
            notes.append("KKT residuals left out: the data has no training split.")
        elif splits["train"].margins.min() <= 0:
            notes.append("KKT residuals left out: the model does not classify every training point correctly.")
        else:
            kkt_result = kkt.kkt_residuals(_Homogeneous(model, order), *data["train"], k=kkt_k)
            notes.append("KKT residuals are on this run's train split, which need not be the model's training set.")
    layerwise = net is not None and order is not None and order == sum(net.orders)
    if net is not None:
        kinds, orders, rhos = [r["kind"] for r in lipschitz.layer_table(net, sigmas)], net.orders, parameter_norms(net)
    else:  # one group: all parameters
        kinds, orders = [], [order or 1]
        rhos = [float(torch.cat([p.detach().double().flatten() for p in model.parameters()]).norm())]
    stats = A.CheckpointStats(name=CHECKPOINT, epoch=0, kinds=kinds, orders=orders, rhos=rhos, sigmas=sigmas,
                              certifiable=certifiable, splits=splits, kkt=kkt_result)

    certified = A.certified_table([stats])
    if distances is not None and len(certified):
        A.check_certified(certified, distances)
    best = A.best_distances(distances) if distances is not None else None
    mvr = A.margin_vs_robustness([stats], best, A.pick_epsilons(best), order if order is not None else math.nan)
    if net is None:
        mvr[["spectral_margin", "rho_over_sigma", "median_radius"]] = math.nan
    if not layerwise:
        mvr[["normalized_margin_layerwise", "median_normalized_margin_layerwise"]] = math.nan
    if "train" not in splits:
        notes.append("table1's loss and margins are on the test split: the data has no training split.")
    train = splits.get("train", splits["test"])
    q_min = float(train.margins.min())
    row = {"checkpoint": CHECKPOINT, "epoch": 0,
           "log10_loss": (train.log_sum_loss - math.log(len(train.margins))) / math.log(10.0),
           "normalized_margin": q_min / stats.rho ** order if order is not None else math.nan,
           "normalized_margin_layerwise": q_min / stats.rho_product if layerwise else math.nan,
           "smoothed_normalized_margin": (smoothed_normalized_margin(train.log_sum_loss, "ce", stats.rho ** order)
                                          if order is not None else math.nan),
           "train_acc": float((splits["train"].margins > 0).mean()) if "train" in splits else math.nan,
           "test_acc": float((splits["test"].margins > 0).mean()), "source": "model"}
    tables = {"table1": pd.DataFrame([row]), "lipschitz": A.lipschitz_table([stats]) if net is not None else
              pd.DataFrame(columns=["checkpoint", "epoch", "layer", "kind", "order", "sigma", "rho",
                                    "sigma_over_rho", "sigma_product", "rho_product"]),
              "kkt": A.kkt_table([stats]) if "train" in splits else pd.DataFrame(
                  [{"checkpoint": CHECKPOINT, "epoch": 0, "q_min": math.nan, "eps": math.nan, "delta": math.nan,
                    "k": pd.NA}]).astype({"k": "Int64"}),
              "margin_vs_robustness": mvr, "margins": A.margins_table([stats])}
    if not layerwise:
        tables["margins"]["normalized_margin_layerwise"] = math.nan
    if distances is None:
        notes.append("no robustness/distances.csv: the tables have no attack columns; run `robustmargin attack` first")
    result = A.Analysis(tables=tables, certified=certified, warnings=notes)
    if write:
        A.write_tables(run_dir, result)
        atomic_write_text(run_dir / NOTES, "".join(f"{n}\n" for n in notes))
    return result


def read_notes(run_dir: str | Path) -> list[str]:
    """The analysis's one-line notes on what was left out (for the report)."""
    path = Path(run_dir) / NOTES
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line] if path.is_file() else []


__all__ = ["ExternalRun", "analyze_external", "attack_spec", "evaluate", "homogeneity_order", "is_external",
           "read_external", "run_model", "trace_chain", "traced_net"]
