"""The one map from ``model.family`` to a builder, and the entry points that size a model from data.

A builder takes the model spec and the data's :class:`Dims` and returns a plain ``nn.Module``; it
refuses dims its family cannot read (a CNN without an image shape). A new family is a module with a
``build`` function and one line in :data:`FAMILIES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from orchard.config import JobSpec, ModelSpec
from orchard.models import cnn, mlp, rnn, transformer
from orchard.models.layers import TargetScale


@dataclass(frozen=True)
class Dims:
    """What a builder needs to know about the rows: sizes and shapes, never the data itself."""

    feature_dim: int
    num_outputs: int
    image_shape: Sequence[int] | None = None
    seq_shape: Sequence[int] | None = None  # data.sequence_shape as given; None = derive it
    cardinalities: Sequence[int] = ()
    vocab_size: int | None = None  # next_token data: features are token ids below this

    def sequence_shape(self) -> tuple[int, int]:
        return sequence_shape(self.feature_dim, self.image_shape, self.seq_shape)


Builder = Callable[[ModelSpec, Dims], nn.Module]

FAMILIES: dict[str, Builder] = {
    "mlp": mlp.build,
    "cnn": cnn.build,
    "rnn": rnn.build,
    "transformer": transformer.build,
}


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


def num_outputs(manifest: dict, loss: str = "auto") -> int:
    """Output width: one per class, or a single unit for regression and BCE-trained binary tasks."""
    if manifest.get("task") == "regression":
        return 1
    if manifest["num_classes"] == 2 and loss in ("auto", "bce"):
        return 1
    return manifest["num_classes"]


def build_from_dims(spec: ModelSpec, feature_dim: int, num_outputs: int, image_shape: Sequence[int] | None = None,
                    seq_shape: Sequence[int] | None = None, cardinalities: Sequence[int] = (),
                    vocab_size: int | None = None) -> nn.Module:
    """The module ``spec.family`` names, sized by explicit dims (tests, or callers without a manifest)."""
    builder = FAMILIES.get(spec.family)
    if builder is None:
        raise ValueError(f"model.family: unknown family {spec.family!r}; valid: {', '.join(FAMILIES)}")
    if vocab_size and spec.family not in ("rnn", "transformer"):
        raise ValueError(f"data.task: next_token data (token ids) needs model.family rnn or transformer, "
                         f"not {spec.family}")
    if cardinalities and spec.family != "mlp":
        raise ValueError(f"data.categorical: embeddings for categorical columns need model.family=mlp, "
                         f"not {spec.family}")
    return builder(spec, Dims(feature_dim, num_outputs, image_shape, seq_shape, tuple(cardinalities), vocab_size))


def build_model(spec: JobSpec, manifest: dict) -> nn.Module:
    """The job's model, sized from the prepared data's manifest.

    Reads ``spec.model``, ``spec.data.sequence_shape`` and ``spec.train.loss`` (a binary task trained
    with BCE has one output); a regression model is wrapped to predict in the target's units.
    """
    cards = [c["cardinality"] for c in manifest.get("categorical") or []]
    vocab = (manifest.get("vocabulary") or {}).get("size")
    model = build_from_dims(spec.model, manifest["feature_dim"], num_outputs(manifest, spec.train.loss),
                            manifest.get("image_shape"), spec.data.sequence_shape, cards, vocab)
    stats = manifest.get("target_stats")
    if manifest.get("task") == "regression" and stats:
        model = TargetScale(model, stats["mean"], stats["std"])
    return model
