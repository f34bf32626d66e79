"""Differential privacy for a federation: Flower's central DP wrappers, its local DP mod, and a budget ledger.

The server wraps its strategy with ``wrap_strategy``; the ClientApp is built with ``client_mods``;
``PrivacyLedger.epsilon_after(round)`` gives the epsilon spent so far at ``privacy.delta`` (None when DP is off).

Accounting model (the one Flower's own accountant uses): client-level DP, add-or-remove-one client, Renyi DP
via ``flwr.supercore.privacy_accounting.RdpAccountant`` (dp-accounting underneath). A central release is the
*uniform* mean of m clipped updates plus N(0, (sigma*C/m)^2), so its noise multiplier is sigma; we force
uniform weights because FedAvg's num-examples weighting lets one client move the mean by more than C/m.
By default no amplification by sampling is claimed: every round counts as if it touched every client.
Flower samples a fixed-size set without replacement, not the Poisson sampling the accountant's amplified
bound assumes, so the spec refuses ``amplification: true`` unless ``fraction_train`` is 1 (no sampling).
SecAgg+ is refused in the spec (see ``PrivacySpec``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from orchard.config import CENTRAL_DP_STRATEGIES, JobSpec


class PrivacyLedger:
    """Privacy budget epsilon spent after each round, at ``spec.federated.privacy.delta``."""

    def __init__(self, spec: JobSpec, num_sampled: int) -> None:
        self.privacy = spec.federated.privacy
        self.population = spec.federated.clients
        self.num_sampled = min(num_sampled, self.population)
        # (round, noise multiplier) per Gaussian release that reached the global model.
        self.releases: list[tuple[int, float]] = []

    def record(self, server_round: int, noise_multiplier: float) -> None:
        """One Gaussian release of ``server_round``, at the noise multiplier it really had."""
        self.releases.append((server_round, noise_multiplier))

    def local_noise_multiplier(self) -> float:
        """The local mod's noise stddev over its sensitivity 2C (any two clipped updates differ by <= 2C)."""
        return math.sqrt(2 * math.log(1.25 / self.privacy.delta)) / self.privacy.epsilon

    def epsilon_after(self, server_round: int) -> float | None:
        mode = self.privacy.mode
        if mode == "none":
            return None
        if mode == "local":
            # Worst-case client: one that replied in every round so far (exact with fraction_train = 1).
            # Its own view, so no sampling amplification; RDP composition, valid for any per-reply epsilon.
            events = [self.local_noise_multiplier()] * server_round
            return _epsilon(events, 1, 1, self.privacy.delta)
        events = [z for r, z in self.releases if r <= server_round]
        sampled = self.num_sampled if self.privacy.amplification else self.population
        return _epsilon(events, sampled, self.population, self.privacy.delta)


def _epsilon(noise_multipliers: list[float], sampled: int, population: int, delta: float) -> float:
    if not noise_multipliers:
        return 0.0
    method = SamplingMethod.NO_AMPLIFICATION if sampled >= population else SamplingMethod.POISSON
    accountant = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                             neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                             sampling_method=method))
    # dp-accounting logs (absl) a warning per low RDP order it cannot bound under Poisson sampling and
    # drops that order: harmless, but it would flood the run's output every round.
    absl = logging.getLogger("absl")
    level, absl.level = absl.level, logging.ERROR
    try:
        for z in noise_multipliers:
            accountant.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=sampled,
                                                    population_size=population))
        return accountant.get_epsilon(delta)
    finally:
        absl.setLevel(level)


def _uniform_weights(strategy: Any, replies: list[Message]) -> list[Message]:
    """Every reply weighs 1 in the mean, so one client moves it by at most C/m (the noise's calibration)."""
    key = getattr(strategy, "weighted_by_key", "num-examples")
    for reply in replies:
        if not reply.has_error():
            for record in reply.content.metric_records.values():
                if key in record:
                    record[key] = 1
    return replies


class FixedClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, with uniform weights and each release written to the ledger."""

    def __init__(self, strategy: Any, noise_multiplier: float, clipping_norm: float, num_sampled: int,
                 ledger: PrivacyLedger) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled)
        self.ledger = ledger

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = _uniform_weights(self.strategy, list(replies))
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            # Noise is sigma*C/m but the mean is over the m' replies that came: fewer replies, less privacy.
            used = sum(not r.has_error() for r in replies)
            self.ledger.record(server_round, self.noise_multiplier * used / self.num_sampled_clients)
        return arrays, metrics


class AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping (Andrew et al.), with two fixes and honest accounting.

    Flower 1.42 steps the norm the wrong way (its bit is "was clipped", yet it shrinks the norm when more
    than the target were clipped, so the norm collapses) and noises round t with the norm already updated
    for t+1. Here the norm follows Andrew et al. (target = fraction left unclipped) and moves after the noise.
    """

    def __init__(self, strategy: Any, spec: JobSpec, num_sampled: int, ledger: PrivacyLedger) -> None:
        p = spec.federated.privacy
        count_std = p.clipped_count_stddev or max(num_sampled / 20, 2 * p.noise_multiplier)
        super().__init__(strategy, p.noise_multiplier, num_sampled, initial_clipping_norm=p.clipping_norm,
                         target_clipped_quantile=p.target_quantile, clip_norm_lr=p.clip_norm_lr,
                         clipped_count_stddev=count_std)
        self.ledger = ledger
        self._clipped_fraction: float | None = None

    def _geometric_update(self, clipped_fraction: float) -> None:
        self._clipped_fraction = clipped_fraction  # applied after this round's noise

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = _uniform_weights(self.strategy, list(replies))
        self._clipped_fraction = None
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self._clipped_fraction is not None:
            unclipped = 1.0 - self._clipped_fraction
            self.clipping_norm *= math.exp(-self.clip_norm_lr * (unclipped - self.target_clipped_quantile))
            # The clipped count is a release too: Flower's bits are not centred, so its sensitivity is 1.
            self.ledger.record(server_round, self.clipped_count_stddev)
        if arrays is not None:
            used = sum(not r.has_error() for r in replies)
            self.ledger.record(server_round, self.noise_multiplier * used / self.num_sampled_clients)
        return arrays, metrics


def wrap_strategy(strategy: Any, spec: JobSpec, num_sampled: int, ledger: PrivacyLedger) -> Any:
    """The strategy, wrapped in Flower's central DP clipping when the spec asks for it."""
    p = spec.federated.privacy
    if not p.mode.startswith("central"):
        return strategy
    name = spec.federated.strategy.name
    if name not in CENTRAL_DP_STRATEGIES or not isinstance(strategy, FedAvg):
        raise ValueError(f"federated.privacy.mode={p.mode} needs federated.strategy.name "
                         f"{' or '.join(CENTRAL_DP_STRATEGIES)}, got {name}: the noise is calibrated to a plain mean of clipped updates")
    if p.mode == "central_fixed":
        return FixedClipping(strategy, p.noise_multiplier, p.clipping_norm, num_sampled, ledger)
    return AdaptiveClipping(strategy, spec, num_sampled, ledger)


def client_mods(spec: JobSpec) -> list:
    """ClientApp mods: Flower's LocalDpMod when the spec asks for local DP."""
    p = spec.federated.privacy
    if p.mode != "local":
        return []
    from flwr.clientapp.mod import LocalDpMod

    # Sensitivity 2C: local DP hides the whole update, and any two updates clipped to C differ by <= 2C.
    return [LocalDpMod(clipping_norm=p.clipping_norm, sensitivity=2 * p.clipping_norm,
                       epsilon=p.epsilon, delta=p.delta)]
