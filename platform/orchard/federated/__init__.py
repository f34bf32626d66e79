"""Flower federated learning: partitions, ServerApp/ClientApp factories, the simulation entry point.

``run_federated`` is imported lazily so that ``orchard.federated.partitions`` is usable without
importing Flower.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Flower reads this at import; its usage pings would only time out on closed networks. Users can opt in.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

if TYPE_CHECKING:
    from orchard.federated.simulation import run_federated

__all__ = ["run_federated"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from orchard.federated import simulation

        return getattr(simulation, name)
    raise AttributeError(f"module 'orchard.federated' has no attribute {name!r}")
