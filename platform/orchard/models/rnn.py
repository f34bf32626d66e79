"""Recurrent family (LSTM or GRU) over a row read as [steps, features]."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from orchard.config import ModelSpec
from orchard.models.layers import SequenceHead, TokenEmbedding, norm_1d

if TYPE_CHECKING:
    from orchard.models.registry import Dims


class RNN(nn.Module):
    """LSTM/GRU over a row read as [steps, features], or over embedded token ids (``vocab_size``)."""

    def __init__(self, seq_shape: Sequence[int], num_outputs: int, spec: ModelSpec,
                 vocab_size: int | None = None) -> None:
        super().__init__()
        self.seq_shape = tuple(seq_shape)
        self.tokens = None
        if vocab_size:
            self.tokens = TokenEmbedding(vocab_size, spec.embed_dim, self.seq_shape[0])
            self.seq_shape = (self.seq_shape[0], spec.embed_dim)
        cls = nn.LSTM if spec.cell == "lstm" else nn.GRU
        self.rnn = cls(self.seq_shape[1], spec.rnn_hidden, num_layers=spec.rnn_layers, batch_first=True,
                       bidirectional=spec.bidirectional, dropout=spec.dropout if spec.rnn_layers > 1 else 0.0)
        width = spec.rnn_hidden * (2 if spec.bidirectional else 1)
        self.norm = norm_1d("layer" if spec.norm == "layer" else "none", width)
        self.head = SequenceHead(width, num_outputs, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(x) if self.tokens is not None else x.reshape(x.shape[0], *self.seq_shape)
        out, _ = self.rnn(x)
        return self.head(self.norm(out))


def build(spec: ModelSpec, dims: Dims) -> RNN:
    return RNN(dims.sequence_shape(), dims.num_outputs, spec, dims.vocab_size)
