"""The framework-free train/evaluate loop shared by Ray Train workers and Flower clients."""

from orchard.engine.loop import (
    EpochResult,
    build_optimizer,
    evaluate,
    seed_everything,
    train_epoch,
)
from orchard.engine.metrics import classification_metrics

__all__ = [
    "EpochResult",
    "build_optimizer",
    "classification_metrics",
    "evaluate",
    "seed_everything",
    "train_epoch",
]
