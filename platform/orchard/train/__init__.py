"""Ray Train + Ray Data: the launcher (driver side) and the per-worker loop."""

from orchard.train.launcher import TrainResult, run_training

__all__ = ["TrainResult", "run_training"]
