"""Differential privacy and secure aggregation for a federation (placeholder signatures; being built).

The server wraps its strategy with ``wrap_strategy``; the ClientApp is built with ``client_mods``;
``PrivacyLedger.epsilon_after(round)`` gives the budget spent so far (None when no DP is on).
"""

from __future__ import annotations

from typing import Any

from orchard.config import JobSpec


class PrivacyLedger:
    """Privacy budget epsilon spent after each round, at ``spec.federated.privacy.delta``."""

    def __init__(self, spec: JobSpec, num_sampled: int) -> None:
        self.spec, self.num_sampled = spec, num_sampled

    def epsilon_after(self, server_round: int) -> float | None:
        return None


def wrap_strategy(strategy: Any, spec: JobSpec, num_sampled: int, ledger: PrivacyLedger) -> Any:
    """The strategy, wrapped in Flower's central DP clipping when the spec asks for it."""
    return strategy


def client_mods(spec: JobSpec) -> list:
    """ClientApp mods: local DP and SecAgg+ when the spec asks for them."""
    return []
