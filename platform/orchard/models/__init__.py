"""Plain ``nn.Module`` families and the registry from a spec to a module.

No Ray, Flower or MLflow here: devices, distribution and tracking are applied from outside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from orchard.config import ModelSpec

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


def _norm_1d(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    return nn.Identity()


def _norm_2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        # GroupNorm with one group normalizes over (C, H, W) like LayerNorm, for any spatial size.
        return nn.GroupNorm(1, channels)
    return nn.Identity()


def _dense_stack(in_dim: int, widths: Sequence[int], spec: ModelSpec) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(in_dim, w), _norm_1d(spec.norm, w), activation(spec.activation), nn.Dropout(spec.dropout)]
        in_dim = w
    return nn.Sequential(*layers), in_dim


class MLP(nn.Module):
    """Feed-forward classifier over a flat feature vector."""

    def __init__(self, in_dim: int, num_outputs: int, spec: ModelSpec) -> None:
        super().__init__()
        self.body, width = _dense_stack(in_dim, spec.hidden, spec)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


class CNN(nn.Module):
    """2-D conv blocks (conv → norm → act → pool) then a dense head; input is a flat row reshaped."""

    def __init__(self, image_shape: Sequence[int], num_outputs: int, spec: ModelSpec) -> None:
        super().__init__()
        c, h, w = image_shape
        self.image_shape = (c, h, w)
        blocks: list[nn.Module] = []
        for out_c in spec.channels:
            blocks += [
                nn.Conv2d(c, out_c, spec.kernel_size, padding=spec.kernel_size // 2),
                _norm_2d(spec.norm, out_c),
                activation(spec.activation),
            ]
            if spec.pool != "none" and min(h, w) >= 2:
                blocks.append(nn.MaxPool2d(2) if spec.pool == "max" else nn.AvgPool2d(2))
                h, w = h // 2, w // 2
            c = out_c
        self.features = nn.Sequential(*blocks)
        self.head_body, width = _dense_stack(c * h * w, spec.hidden, spec)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)
        return self.head(self.head_body(self.features(x).flatten(1)))


def build_model(spec: ModelSpec, feature_dim: int, num_outputs: int, image_shape: Sequence[int] | None) -> nn.Module:
    """The module a spec names, sized from the prepared data's manifest."""
    if spec.family == "mlp":
        return MLP(feature_dim, num_outputs, spec)
    if spec.family == "cnn":
        if not image_shape:
            raise ValueError("model.family=cnn needs data.image_shape (e.g. [1, 8, 8])")
        if math.prod(image_shape) != feature_dim:
            raise ValueError(f"data.image_shape {list(image_shape)} holds {math.prod(image_shape)} values, "
                             f"but rows have {feature_dim} features")
        return CNN(image_shape, num_outputs, spec)
    raise ValueError(f"model.family: unknown family {spec.family!r}")


def model_from_manifest(spec: ModelSpec, manifest: dict) -> nn.Module:
    return build_model(spec, manifest["feature_dim"], manifest["num_classes"], manifest.get("image_shape"))
