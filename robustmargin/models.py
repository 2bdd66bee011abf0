"""Homogeneous model zoo: the paper's MNIST CNN, the CIFAR-10 VGG-16 variant and an MLP.

Every model is a chain of weight layers (Conv2d / Linear) separated by a positively homogeneous
activation and max-pools. Each weight layer is one parameter group; a bias in the first layer belongs
to group 1 (the first layer stays jointly linear in (W1, b1)); a bias in any later layer breaks
homogeneity. With activation degree k (ReLU: 1, squared ReLU: 2) the order of group i is
k^(number of activations after layer i), and the network's order in θ is the sum of the orders.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from robustmargin.errors import UserError

MODELS = ("cnn", "vgg16", "mlp")
BIASES = ("none", "first", "all")
ACTIVATIONS = {"relu": 1, "relu2": 2}


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a model; stored in every checkpoint."""

    name: str = "cnn"
    bias: str = "first"
    width: float = 1.0
    activation: str = "relu"
    hidden: tuple[int, ...] = (512, 512)  # MLP only
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["hidden"] = list(self.hidden)
        return d


class HomogeneousNet(nn.Module):
    """A chain of layers whose weight layers are the parameter groups."""

    def __init__(self, layers: list[nn.Module], spec: ModelSpec):
        super().__init__()
        self.body = nn.Sequential(*layers)
        self.spec = spec
        self.weight_layers: list[nn.Module] = [m for m in self.body if isinstance(m, (nn.Conv2d, nn.Linear))]
        degree = ACTIVATIONS[spec.activation]
        n_act = [sum(isinstance(m, (nn.ReLU, SquaredReLU)) for m in self.body[i + 1:])
                 for i, m in enumerate(self.body) if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.orders: list[int] = [degree ** k for k in n_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    @property
    def order(self) -> int:
        """L in f(cθ) = c^L f(θ)."""
        return sum(self.orders)

    @property
    def is_homogeneous(self) -> bool:
        return all(m.bias is None for m in self.weight_layers[1:])

    def layer_groups(self) -> list[list[nn.Parameter]]:
        return [[p for p in (m.weight, m.bias) if p is not None] for m in self.weight_layers]


def _weight_layer(kind: str, n_in: int, n_out: int, bias: bool, kernel: int = 3) -> nn.Module:
    layer = (nn.Conv2d(n_in, n_out, kernel, padding=kernel // 2, bias=bias) if kind == "conv"
             else nn.Linear(n_in, n_out, bias=bias))
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")  # He-normal, as in the paper's code
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _scaled(n: int, width: float) -> int:
    return max(1, int(round(n * width)))


def build_model(spec: ModelSpec) -> HomogeneousNet:
    """Build a freshly initialised model; draws from torch's global RNG (seed it first)."""
    if spec.name not in MODELS:
        raise UserError(f"unknown model {spec.name!r}; choose one of {', '.join(MODELS)}")
    if spec.bias not in BIASES:
        raise UserError(f"unknown bias {spec.bias!r}; choose one of {', '.join(BIASES)}")
    if spec.activation not in ACTIVATIONS:
        raise UserError(f"unknown activation {spec.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if not spec.width > 0:
        raise UserError(f"model width must be positive, got {spec.width}")
    min_size = {"cnn": 4, "vgg16": 32, "mlp": 1}[spec.name]
    if spec.image_size < min_size:
        raise UserError(f"image size {spec.image_size} is too small for model {spec.name} (needs {min_size})")
    act = nn.ReLU if spec.activation == "relu" else SquaredReLU
    count = 0

    def layer(kind: str, n_in: int, n_out: int, kernel: int = 3) -> nn.Module:
        nonlocal count
        count += 1
        bias = spec.bias == "all" or (spec.bias == "first" and count == 1)
        return _weight_layer(kind, n_in, n_out, bias, kernel)

    c, s, w = spec.in_channels, spec.image_size, spec.width
    layers: list[nn.Module] = []
    if spec.name == "cnn":
        c1, c2, h = _scaled(32, w), _scaled(64, w), _scaled(1024, w)
        layers = [layer("conv", c, c1, 5), act(), nn.MaxPool2d(2),
                  layer("conv", c1, c2, 3), act(), nn.MaxPool2d(2), nn.Flatten(),
                  layer("fc", c2 * (s // 4) ** 2, h), act(), layer("fc", h, spec.num_classes)]
    elif spec.name == "vgg16":
        for block, (channels, reps) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
            for _ in range(reps):
                layers += [layer("conv", c, _scaled(channels, w)), act()]
                c = _scaled(channels, w)
            layers.append(nn.MaxPool2d(2))
            s //= 2
        layers += [nn.Flatten(), layer("fc", c * s * s, spec.num_classes)]
    else:
        n_in = c * s * s
        layers = [nn.Flatten()]
        for h in spec.hidden:
            layers += [layer("fc", n_in, _scaled(h, w)), act()]
            n_in = _scaled(h, w)
        layers.append(layer("fc", n_in, spec.num_classes))
    return HomogeneousNet(layers, spec)


def parameter_norms(model: HomogeneousNet) -> list[float]:
    """ρ_i = Frobenius norm of each parameter group (float64)."""
    return [math.sqrt(sum(float(p.detach().double().square().sum()) for p in g)) for g in model.layer_groups()]
