"""2-D convolutional family over a row read as an image."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from orchard.config import ModelSpec
from orchard.models.layers import activation, dense_stack, norm_2d

if TYPE_CHECKING:
    from orchard.models.registry import Dims


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
                norm_2d(spec.norm, out_c),
                activation(spec.activation),
            ]
            if spec.pool != "none" and min(h, w) >= 2:
                blocks.append(nn.MaxPool2d(2) if spec.pool == "max" else nn.AvgPool2d(2))
                h, w = h // 2, w // 2
            c = out_c
        self.features = nn.Sequential(*blocks)
        self.head_body, width = dense_stack(c * h * w, spec.hidden, spec)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)
        return self.head(self.head_body(self.features(x).flatten(1)))


def build(spec: ModelSpec, dims: Dims) -> CNN:
    image_shape = dims.image_shape
    if not image_shape:
        raise ValueError("model.family=cnn needs data.image_shape (e.g. [1, 8, 8])")
    if math.prod(image_shape) != dims.feature_dim:
        raise ValueError(f"data.image_shape {list(image_shape)} holds {math.prod(image_shape)} values, "
                         f"but rows have {dims.feature_dim} features")
    return CNN(image_shape, dims.num_outputs, spec)
