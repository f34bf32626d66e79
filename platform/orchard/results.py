"""What an engine hands to tracking: the result it returns and the logger it reports through.

Ray Train (``train``) and Flower (``federated``) both return a ``RunResult``; tracking logs it without
knowing which engine made it, and engines never hold the MLflow run. Nothing here imports torch, numpy
or mlflow at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import numpy as np
    from torch import nn


class MetricLogger(Protocol):
    """Anything that takes one step's metrics (``tracking.RunLogger``); picklable where it crosses processes."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> Any: ...


@dataclass(frozen=True)
class PartitionTable:
    """A federation's training data per client, as plain data: one row per client."""

    columns: list[str]  # client, rows, (natural partitions) id, then "class <c>" per class
    rows: list[list[Any]]
    counts: list[int]  # training rows held by each client
    label_counts: list[list[int]]  # [client][class]; empty for a regression target
    classes: list[Any]  # the label names of label_counts' columns
    name: str  # the partition set's name, e.g. "dirichlet-a1-n4-s0"


@dataclass
class RunResult:
    """One engine run: the model, what it learned step by step, and how it did on the test split."""

    model: nn.Module  # the final (or best) model, on CPU, in eval mode
    # One row per step: {"epoch": n, "train/loss": ..., "val/loss": ...} or {"round": n, "fed/val_loss": ...};
    # validation figures only: the test split is scored once, into ``test``.
    history: list[dict[str, Any]]
    x: Literal["epoch", "round"]  # the step key of history rows
    test: dict[str, float]  # "test/accuracy", "test/f1", ... (or "test/r2", ...) of ``model``, scored once
    confusion: np.ndarray | None = None  # classification only
    clients: list[dict[str, Any]] | None = None  # federated: one row per sampled client and round
    partitions: PartitionTable | None = None  # federated
    # Engine specifics (train: best_epoch, checkpoint_path; federated: best_round, stopped_round).
    extra: dict[str, Any] = field(default_factory=dict)

    def headline(self) -> tuple[str, float]:
        """The test metric people look at first: accuracy, or R² for regression."""
        if "test/r2" in self.test:
            return "R²", self.test["test/r2"]
        return "accuracy", self.test["test/accuracy"]
