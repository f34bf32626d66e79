"""Plain ``nn.Module`` families and the registry from a spec to a module.

No Ray, Flower or MLflow here: devices, distribution and tracking are applied from outside.
One module per family (``mlp``, ``cnn``, ``rnn``, ``transformer``), shared layers in ``layers``,
and the family → builder map plus the entry points in ``registry``.
"""

from orchard.models.cnn import CNN
from orchard.models.layers import TargetScale
from orchard.models.mlp import MLP
from orchard.models.registry import FAMILIES, build_from_dims, build_model, num_outputs, sequence_shape
from orchard.models.rnn import RNN
from orchard.models.transformer import TransformerEncoder

__all__ = [
    "CNN", "FAMILIES", "MLP", "RNN", "TargetScale", "TransformerEncoder",
    "build_from_dims", "build_model", "num_outputs", "sequence_shape",
]
