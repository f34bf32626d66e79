"""Differential privacy for a federation: Flower's central-DP wrappers, its local-DP mod, and the budget.

The server wraps its strategy with ``wrap_strategy``; the ClientApp is built with ``client_mods``;
``PrivacyLedger.epsilon_after(round)`` is the budget spent after that many rounds (None without DP).

Accounting (client-level DP, one client's whole update is the unit of privacy):
- central: each round releases the clipped mean plus Gaussian noise of stddev σ·C/n, i.e. a Gaussian
  mechanism with noise multiplier σ. Flower samples exactly n of N clients without replacement, so with
  ``amplification`` the round is a sampled-without-replacement Gaussian (replace-one neighbours), composed
  with Flower's RDP accountant (Google's dp-accounting); without it, or when every client is sampled, no
  amplification is claimed. Adaptive clipping spends part of σ on the clipped-count (Andrew et al.):
  Flower solves σ_update⁻² + (2σ_count)⁻² = σ⁻², so the joint release is accounted at σ.
- local: each reply carries Gaussian noise calibrated by Flower's ``LocalDpMod`` to (ε, δ) per reply;
  over r rounds a client that took part in all of them has spent at most (r·ε, r·δ) (basic composition,
  the stated bound; tighter ones exist).
SecAgg+ is refused by the spec (see ``PrivacySpec``): Flower 1.42 ships it only for the legacy workflow.
"""

from __future__ import annotations

from typing import Any

from orchard.config import JobSpec


class PrivacyLedger:
    """Privacy budget epsilon spent after each round, at ``spec.federated.privacy.delta``."""

    def __init__(self, spec: JobSpec, num_sampled: int) -> None:
        self.spec, self.num_sampled = spec, num_sampled
        self.privacy = spec.federated.privacy
        self._cache: dict[int, float] = {}

    def epsilon_after(self, server_round: int) -> float | None:
        mode = self.privacy.mode
        if mode == "none" or server_round < 1:
            return None
        if mode == "local":
            return server_round * self.privacy.epsilon
        if server_round not in self._cache:
            self._cache[server_round] = central_epsilon(
                self.privacy.noise_multiplier, self.num_sampled, self.spec.federated.clients, server_round,
                self.privacy.delta, self.privacy.amplification)
        return self._cache[server_round]

    def delta_after(self, server_round: int) -> float | None:
        if self.privacy.mode == "none":
            return None
        return server_round * self.privacy.delta if self.privacy.mode == "local" else self.privacy.delta


def central_epsilon(noise_multiplier: float, sampled: int, clients: int, rounds: int, delta: float,
                    amplification: bool = True) -> float:
    """ε after ``rounds`` Gaussian releases of noise multiplier σ, with ``sampled`` of ``clients`` per round."""
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    subsampled = amplification and sampled < clients
    config = PrivacyConfig(
        target_delta=delta, population_size=clients,
        # dp-accounting defines sampling without replacement for replace-one neighbours only.
        neighboring_relation=NeighboringRelation.REPLACE_ONE if subsampled else NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.WITHOUT_REPLACEMENT if subsampled else SamplingMethod.NO_AMPLIFICATION)
    accountant = RdpAccountant(config)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, sampled, clients), count=rounds)
    return accountant.get_epsilon(delta)


def wrap_strategy(strategy: Any, spec: JobSpec, num_sampled: int, ledger: PrivacyLedger) -> Any:
    """The strategy, wrapped in Flower's server-side clipping and noise when the spec asks for central DP."""
    from flwr.serverapp.strategy import (
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    p = spec.federated.privacy
    if p.mode == "central_fixed":
        return DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=p.noise_multiplier, clipping_norm=p.clipping_norm,
            num_sampled_clients=num_sampled)
    if p.mode == "central_adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            strategy, noise_multiplier=p.noise_multiplier, num_sampled_clients=num_sampled,
            initial_clipping_norm=p.clipping_norm, target_clipped_quantile=p.target_quantile,
            clip_norm_lr=p.clip_norm_lr, clipped_count_stddev=p.clipped_count_stddev)
    return strategy


def client_mods(spec: JobSpec) -> list:
    """ClientApp mods: Flower's local-DP mod (clip the update to C, add Gaussian noise for (ε, δ) per reply)."""
    p = spec.federated.privacy
    if p.mode != "local":
        return []
    from flwr.clientapp.mod import LocalDpMod

    # Sensitivity of a clipped update is its clipping norm.
    return [LocalDpMod(clipping_norm=p.clipping_norm, sensitivity=p.clipping_norm, epsilon=p.epsilon, delta=p.delta)]
