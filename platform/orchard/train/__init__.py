"""Ray Train + Ray Data: the launcher (driver side) and the per-worker loop."""

from orchard.train.launcher import run_training

__all__ = ["run_training"]
