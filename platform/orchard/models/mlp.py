"""Feed-forward family over a flat feature vector, with embeddings for categorical columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from orchard.config import ModelSpec
from orchard.models.layers import dense_stack

if TYPE_CHECKING:
    from orchard.models.registry import Dims


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
        self.body, width = dense_stack(width, spec.hidden, spec)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if self.embeddings:
            idx = x[:, self.n_numeric :].long()
            parts = [x[:, : self.n_numeric], *(e(idx[:, j]) for j, e in enumerate(self.embeddings))]
            x = torch.cat(parts, dim=1)
        return self.head(self.body(x))


def build(spec: ModelSpec, dims: Dims) -> MLP:
    return MLP(dims.feature_dim, dims.num_outputs, spec, dims.cardinalities)
