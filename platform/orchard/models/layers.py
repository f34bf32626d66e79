"""Layers every family shares: activations, norms, the dense stack, the sequence head, the target scale."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from orchard.config import ModelSpec

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def norm_1d(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    return nn.Identity()


def norm_2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        # GroupNorm with one group normalizes over (C, H, W) like LayerNorm, for any spatial size.
        return nn.GroupNorm(1, channels)
    return nn.Identity()


def dense_stack(in_dim: int, widths: Sequence[int], spec: ModelSpec) -> tuple[nn.Sequential, int]:
    """(linear → norm → activation → dropout) per width; returns the stack and its output width."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(in_dim, w), norm_1d(spec.norm, w), activation(spec.activation), nn.Dropout(spec.dropout)]
        in_dim = w
    return nn.Sequential(*layers), in_dim


class TokenEmbedding(nn.Module):
    """Token ids (carried as floats in the prepared features, exact below 2**24) to vectors: [batch, steps, dim]."""

    def __init__(self, vocab_size: int, dim: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.embed = nn.Embedding(vocab_size, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.reshape(x.shape[0], self.steps)
        return self.embed(ids if ids.dtype == torch.long else ids.round().long())


class SequenceHead(nn.Module):
    """Pools a [batch, steps, width] sequence to one vector, then the dense head."""

    def __init__(self, width: int, num_outputs: int, spec: ModelSpec) -> None:
        super().__init__()
        self.pooling = spec.pooling
        self.body, width = dense_stack(width, spec.hidden, spec)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pooled = {"mean": lambda: h.mean(1), "cls": lambda: h[:, 0], "last": lambda: h[:, -1]}[self.pooling]()
        return self.head(self.body(pooled))


class TargetScale(nn.Module):
    """Regression output in the target's units: mean + std * body(x), so the body learns unit-scale values."""

    def __init__(self, body: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.std + self.mean
