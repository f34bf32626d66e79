"""The framework-free train/evaluate loop shared by Ray Train workers and Flower clients."""

from orchard.engine.loop import (
    EpochResult,
    LoopOptions,
    build_optimizer,
    build_scheduler,
    evaluate,
    seed_everything,
    train_epoch,
)
from orchard.engine.metrics import classification_metrics
from orchard.engine.tasks import Task, make_task

__all__ = [
    "EpochResult",
    "LoopOptions",
    "Task",
    "build_optimizer",
    "build_scheduler",
    "make_task",
    "classification_metrics",
    "evaluate",
    "seed_everything",
    "train_epoch",
]
