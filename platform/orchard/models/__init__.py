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
    """Feed-forward network over a flat feature vector.

    With categorical columns, their indices sit in the last ``len(cardinalities)`` positions of the row;
    each gets a learned embedding (width min(50, ceil(cardinality / 2))) concatenated to the numeric part.
    """

    def __init__(self, in_dim: int, num_outputs: int, spec: ModelSpec, cardinalities: Sequence[int] = ()) -> None:
        super().__init__()
        self.n_numeric = in_dim - len(cardinalities)
        self.embeddings = nn.ModuleList(nn.Embedding(c, min(50, (c + 1) // 2)) for c in cardinalities)
        width = self.n_numeric + sum(e.embedding_dim for e in self.embeddings)
        self.body, width = _dense_stack(width, spec.hidden, spec)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if self.embeddings:
            idx = x[:, self.n_numeric :].long()
            parts = [x[:, : self.n_numeric], *(e(idx[:, j]) for j, e in enumerate(self.embeddings))]
            x = torch.cat(parts, dim=1)
        return self.head(self.body(x))


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


class _SequenceHead(nn.Module):
    """Pools a [batch, steps, width] sequence to one vector, then the dense head."""

    def __init__(self, width: int, num_outputs: int, spec: ModelSpec) -> None:
        super().__init__()
        self.pooling = spec.pooling
        self.body, width = _dense_stack(width, spec.hidden, spec)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pooled = {"mean": lambda: h.mean(1), "cls": lambda: h[:, 0], "last": lambda: h[:, -1]}[self.pooling]()
        return self.head(self.body(pooled))


class RNN(nn.Module):
    """LSTM/GRU over a row read as [steps, features]."""

    def __init__(self, seq_shape: Sequence[int], num_outputs: int, spec: ModelSpec) -> None:
        super().__init__()
        self.seq_shape = tuple(seq_shape)
        cls = nn.LSTM if spec.cell == "lstm" else nn.GRU
        self.rnn = cls(self.seq_shape[1], spec.rnn_hidden, num_layers=spec.rnn_layers, batch_first=True,
                       bidirectional=spec.bidirectional, dropout=spec.dropout if spec.rnn_layers > 1 else 0.0)
        width = spec.rnn_hidden * (2 if spec.bidirectional else 1)
        self.norm = _norm_1d("layer" if spec.norm == "layer" else "none", width)
        self.head = _SequenceHead(width, num_outputs, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.reshape(x.shape[0], *self.seq_shape))
        return self.head(self.norm(out))


class TransformerEncoder(nn.Module):
    """Pre-norm encoder with learned positions; attention runs through scaled_dot_product_attention."""

    def __init__(self, seq_shape: Sequence[int], num_outputs: int, spec: ModelSpec) -> None:
        super().__init__()
        steps, feats = seq_shape
        self.seq_shape = (steps, feats)
        self.cls = spec.pooling == "cls"
        self.embed = nn.Linear(feats, spec.d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.d_model)) if self.cls else None
        self.pos = nn.Parameter(torch.randn(1, steps + int(self.cls), spec.d_model) * 0.02)
        self.blocks = nn.ModuleList(_Block(spec) for _ in range(spec.layers))
        self.norm = nn.LayerNorm(spec.d_model)
        self.head = _SequenceHead(spec.d_model, num_outputs, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], *self.seq_shape))
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h = h + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class _Block(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        d = spec.d_model
        self.heads = spec.heads
        self.dropout = spec.dropout
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, spec.ff_mult * d), activation(spec.activation),
                                nn.Linear(spec.ff_mult * d, d))
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ff(self.norm2(x)))


def sequence_shape(feature_dim: int, image_shape: Sequence[int] | None,
                   explicit: Sequence[int] | None = None) -> tuple[int, int]:
    """[steps, features] for sequence models: explicit, else image rows ([C,H,W] -> [H, C*W]), else 1 per step."""
    if explicit:
        shape = tuple(explicit)
    elif image_shape:
        c, h, w = image_shape
        return h, c * w
    else:
        shape = (feature_dim, 1)
    if len(shape) != 2 or math.prod(shape) != feature_dim:
        raise ValueError(f"data.sequence_shape {list(shape)} must be [steps, features] holding {feature_dim} values")
    return shape  # type: ignore[return-value]


def build_model(spec: ModelSpec, feature_dim: int, num_outputs: int, image_shape: Sequence[int] | None,
                seq_shape: Sequence[int] | None = None, cardinalities: Sequence[int] = ()) -> nn.Module:
    """The module a spec names, sized from the prepared data's manifest."""
    if cardinalities and spec.family != "mlp":
        raise ValueError(f"data.categorical: embeddings for categorical columns need model.family=mlp, "
                         f"not {spec.family}")
    if spec.family in ("rnn", "transformer"):
        shape = sequence_shape(feature_dim, image_shape, seq_shape)
        return (RNN if spec.family == "rnn" else TransformerEncoder)(shape, num_outputs, spec)
    if spec.family == "mlp":
        return MLP(feature_dim, num_outputs, spec, cardinalities)
    if spec.family == "cnn":
        if not image_shape:
            raise ValueError("model.family=cnn needs data.image_shape (e.g. [1, 8, 8])")
        if math.prod(image_shape) != feature_dim:
            raise ValueError(f"data.image_shape {list(image_shape)} holds {math.prod(image_shape)} values, "
                             f"but rows have {feature_dim} features")
        return CNN(image_shape, num_outputs, spec)
    raise ValueError(f"model.family: unknown family {spec.family!r}")


def num_outputs(manifest: dict, loss: str = "auto") -> int:
    """Output width: one per class, or a single unit for regression and BCE-trained binary tasks."""
    if manifest.get("task") == "regression":
        return 1
    if manifest["num_classes"] == 2 and loss in ("auto", "bce"):
        return 1
    return manifest["num_classes"]


class TargetScale(nn.Module):
    """Regression output in the target's units: mean + std * body(x), so the body learns unit-scale values."""

    def __init__(self, body: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.std + self.mean


def model_from_manifest(spec: ModelSpec, manifest: dict, seq_shape: Sequence[int] | None = None,
                        loss: str = "auto") -> nn.Module:
    cards = [c["cardinality"] for c in manifest.get("categorical") or []]
    model = build_model(spec, manifest["feature_dim"], num_outputs(manifest, loss), manifest.get("image_shape"),
                        seq_shape, cards)
    stats = manifest.get("target_stats")
    if manifest.get("task") == "regression" and stats:
        model = TargetScale(model, stats["mean"], stats["std"])
    return model
