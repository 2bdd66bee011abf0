"""Run configuration: strict dataclasses, TOML presets, one merge of file and flags.

A config has three sections, [data], [model] and [train]; an unknown section or key is an error that
names it, and every value is type- and range-checked when the config is built.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import tomli_w

from robustmargin.errors import UserError

DATASETS = ("mnist5k", "mnist", "cifar10")
SCHEDULES = ("constant", "loss-based", "normalized")


@dataclass
class DataConfig:
    name: str = "mnist5k"
    root: str = "data"          # torchvision datasets only
    download: bool = False
    n_train: int = 0            # 0 = the whole split (mnist5k: 4000)
    n_test: int = 0             # 0 = the whole split (mnist5k: the rest)
    split_seed: int = 0         # which stratified subset


@dataclass
class ModelConfig:
    name: str = "cnn"           # cnn | vgg16 | mlp
    bias: str = "first"         # none | first | all
    width: float = 1.0          # channel / unit multiplier
    activation: str = "relu"    # relu | relu2
    hidden: list[int] = field(default_factory=lambda: [512, 512])  # mlp only


@dataclass
class TrainConfig:
    loss: str = "ce"                    # ce | logistic | exp
    schedule: str = "loss-based"        # constant | loss-based | normalized
    lr: float = 0.01                    # constant schedule
    alpha0: float = 0.1                 # loss-based and normalized
    r_up: float = 2 ** (1 / 5)
    r_down: float = 2 ** (1 / 10)
    lr_floor: float = 1e-50             # stop when α falls below
    batch_loss_ceiling: float = 600.0   # a batch loss this many frames high fails the pass
    batch_size: int = 100
    eval_batch_size: int = 1000
    epochs: int = 10000
    seed: int = 0
    device: str = "cpu"
    thresholds: list[float] = field(default_factory=lambda: [-10.0, -15.0, -20.0, -120.0])  # log10 loss
    checkpoint_every_decades: float = 0.0   # > 0: also a checkpoint every this many decades of loss
    stop_log10_loss: float = -math.inf      # stop once the training loss is below 10^this
    max_seconds: float = math.inf           # stop (and save `final`) after this much training time
    max_steps: int = 0                      # stop after this many SGD steps, rolled-back ones included (0: no limit)
    compile: str = "auto"                   # auto: CUDA-graph the SGD step's forward on CUDA | off
    deterministic: bool = True              # CUDA: deterministic kernels, the same bits run to run (slower)
    tf32: bool = False                      # CUDA: TF32 convolutions and matmuls (faster; inputs rounded to 10 bits)
    metrics_every: int = 1                  # test split, β and support counts every this many epochs


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def _coerce(where: str, value: Any, default: Any) -> Any:
    """Check a TOML value against the type of the field's default."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:  # list
        item = type(default[0]) if default else float
        ok = isinstance(value, list) and all(isinstance(v, (int, float) if item is float else item)
                                             and not isinstance(v, bool) for v in value)
        value = [item(v) for v in value] if ok else value
    if not ok:
        raise UserError(f"config key {where} must be {type(default).__name__}, got {value!r}")
    return value


def _check(cfg: Config) -> Config:
    from robustmargin.losses import LOSSES
    from robustmargin.models import ACTIVATIONS, BIASES, MODELS

    d, m, t = cfg.data, cfg.model, cfg.train
    choices = [("data.name", d.name, DATASETS), ("model.name", m.name, MODELS), ("model.bias", m.bias, BIASES),
               ("model.activation", m.activation, tuple(ACTIVATIONS)), ("train.loss", t.loss, LOSSES),
               ("train.schedule", t.schedule, SCHEDULES), ("train.device", t.device.split(":")[0], ("cpu", "cuda")),
               ("train.compile", t.compile, ("auto", "off"))]
    for key, value, allowed in choices:
        if value not in allowed:
            raise UserError(f"config key {key} = {value!r} is not one of {', '.join(allowed)}")
    finite_positive = [("model.width", m.width), ("train.lr", t.lr), ("train.alpha0", t.alpha0),
                       ("train.lr_floor", t.lr_floor), ("train.batch_size", t.batch_size),
                       ("train.eval_batch_size", t.eval_batch_size), ("train.metrics_every", t.metrics_every)]
    for key, value in finite_positive:
        if not 0 < value < math.inf:
            raise UserError(f"config key {key} must be positive and finite, got {value}")
    non_negative = [("data.n_train", d.n_train), ("data.n_test", d.n_test), ("train.epochs", t.epochs),
                    ("train.max_steps", t.max_steps)]
    for key, value in non_negative:
        if not value >= 0:
            raise UserError(f"config key {key} must not be negative, got {value}")
    ranges = [  # (key, value, allowed, text for the message)
        ("data.split_seed", d.split_seed, 0 <= d.split_seed < 2 ** 32, "in [0, 2^32)"),
        # config.toml holds signed 64-bit integers, and the batch order is drawn from seed + 1
        ("train.seed", t.seed, 0 <= t.seed <= 2 ** 63 - 2, "in [0, 2^63 - 2]"),
        ("train.r_up", t.r_up, 1 <= t.r_up < math.inf, "finite and >= 1"),
        ("train.r_down", t.r_down, 1 < t.r_down < math.inf, "finite and > 1"),
        ("train.batch_loss_ceiling", t.batch_loss_ceiling, t.batch_loss_ceiling > 1,
         "> 1 (a multiple of the last full loss)"),
        ("train.max_seconds", t.max_seconds, t.max_seconds > 0, "positive (inf: no limit)"),
        ("train.stop_log10_loss", t.stop_log10_loss, t.stop_log10_loss < 0, "a negative log10 loss (-inf: never)"),
        ("train.checkpoint_every_decades", t.checkpoint_every_decades,
         t.checkpoint_every_decades == 0 or 0.1 <= t.checkpoint_every_decades < math.inf, "0 (off) or >= 0.1 decades"),
    ]
    for key, value, ok, allowed in ranges:
        if not ok:
            raise UserError(f"config key {key} must be {allowed}, got {value}")
    start = ("train.lr", t.lr) if t.schedule == "constant" else ("train.alpha0", t.alpha0)
    if not t.lr_floor < start[1]:
        raise UserError(f"config key train.lr_floor must be below {start[0]} (the run would stop at once), "
                        f"got {t.lr_floor} >= {start[1]}")
    if any(h <= 0 for h in m.hidden):
        raise UserError(f"config key model.hidden must hold positive sizes, got {m.hidden}")
    if any(not x < 0 for x in t.thresholds):
        raise UserError(f"config key train.thresholds holds log10 losses, which must be negative: {t.thresholds}")
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dicts; unknown sections or keys are errors."""
    sections = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise UserError(f"unknown config section [{name}]; expected {', '.join(_SECTIONS)}")
        if not isinstance(value, dict):
            raise UserError(f"config section [{name}] must be a table")
        defaults = _SECTIONS[name]()
        known = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
        for key in value:
            if key not in known:
                raise UserError(f"unknown config key {name}.{key}")
        sections[name] = type(defaults)(**{k: _coerce(f"{name}.{k}", v, known[k]) for k, v in value.items()})
    return _check(Config(**sections))


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Apply dotted overrides ({"train.epochs": 5}) from command-line flags; None means not given."""
    raw = cfg.to_dict()
    for dotted, value in overrides.items():
        if value is not None:
            section, _, key = dotted.partition(".")
            if section not in raw or not key:
                raise UserError(f"unknown config key {dotted}")
            raw[section][key] = value
    return config_from_dict(raw)


def _parse_toml(text: str, source: str) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{source} is not valid TOML: {err}") from None
    return config_from_dict(raw)


def read_text_file(path: str | Path, what: str = "config") -> str:
    """The UTF-8 text of a configuration file; an unreadable or binary file is a one-line UserError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None


def load_config(path: str | Path) -> Config:
    return _parse_toml(read_text_file(path), str(path))


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("robustmargin.presets").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> Config:
    if name not in preset_names():
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    return _parse_toml(resources.files("robustmargin.presets").joinpath(f"{name}.toml").read_text(), f"preset {name}")
