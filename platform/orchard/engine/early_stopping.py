"""Early stopping on a validation metric with patience and min-delta; remembers the best epoch."""

from __future__ import annotations

from typing import Any

from orchard.config import EarlyStoppingSpec


class EarlyStopper:
    def __init__(self, spec: EarlyStoppingSpec | None) -> None:
        self.spec = spec
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    @property
    def should_stop(self) -> bool:
        return self.spec is not None and self.bad_epochs >= self.spec.patience

    def update(self, metrics: dict[str, Any], epoch: int) -> bool:
        """Record an epoch; True when it is the best so far (always False without early stopping)."""
        if self.spec is None:
            return False
        if self.spec.metric not in metrics:
            section, prefix = ("federated", "fed/val_") if self.spec.metric.startswith("fed/") else ("train", "val/")
            raise KeyError(f"{section}.early_stopping.metric: {self.spec.metric!r} is not reported; "
                           f"available: {sorted(k for k in metrics if k.startswith(prefix))}")
        value = float(metrics[self.spec.metric])
        sign = 1.0 if self.spec.direction() == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.spec.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state:
            self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
