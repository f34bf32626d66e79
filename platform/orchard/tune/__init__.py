"""``kind: tune``: Ray Tune over Orchard train or federated jobs, one MLflow child run per trial."""

from orchard.tune.search import run_tune

__all__ = ["run_tune"]
