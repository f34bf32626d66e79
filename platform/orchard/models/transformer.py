"""Transformer encoder family over a row read as [steps, features]."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from orchard.config import ModelSpec
from orchard.models.layers import SequenceHead, TokenEmbedding, activation

if TYPE_CHECKING:
    from orchard.models.registry import Dims


class TransformerEncoder(nn.Module):
    """Pre-norm encoder with learned positions; attention runs through scaled_dot_product_attention."""

    def __init__(self, seq_shape: Sequence[int], num_outputs: int, spec: ModelSpec,
                 vocab_size: int | None = None) -> None:
        super().__init__()
        steps, feats = seq_shape
        self.seq_shape = (steps, feats)
        self.cls = spec.pooling == "cls"
        # Token ids are embedded straight to d_model; real-valued steps are projected.
        self.tokens = TokenEmbedding(vocab_size, spec.d_model, steps) if vocab_size else None
        self.embed = None if vocab_size else nn.Linear(feats, spec.d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.d_model)) if self.cls else None
        self.pos = nn.Parameter(torch.randn(1, steps + int(self.cls), spec.d_model) * 0.02)
        self.blocks = nn.ModuleList(_Block(spec) for _ in range(spec.layers))
        self.norm = nn.LayerNorm(spec.d_model)
        self.head = SequenceHead(spec.d_model, num_outputs, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x) if self.tokens is not None else self.embed(x.reshape(x.shape[0], *self.seq_shape))
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


def build(spec: ModelSpec, dims: Dims) -> TransformerEncoder:
    return TransformerEncoder(dims.sequence_shape(), dims.num_outputs, spec, dims.vocab_size)
