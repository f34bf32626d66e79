"""The ServerApp: the spec's strategy over validated replies, the global model evaluated centrally each round.

``Federation`` is the driver-side record of the federation: the ServerApp runs in a thread of the
calling process under ``run_simulation``, so it fills this object in place (arrays, per-round history,
per-client rows, round checkpoints) and the caller reads the final arrays and history from it afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from torch.utils.data import DataLoader, TensorDataset

from orchard.config import JobSpec
from orchard.engine import EpochResult, evaluate, make_task, seed_everything
from orchard.federated.checkpoint import RoundCheckpoint, restore_strategy, save_round, strategy_state
from orchard.federated.privacy import PrivacyLedger, wrap_strategy
from orchard.federated.strategies import (
    GuardedStrategy,
    ReplyCheck,
    RoundLog,
    build_strategy,
    client_lr,
    num_sampled,
)
from orchard.models import build_model


class FederationError(RuntimeError):
    """The federation cannot make progress (no clients, or no client reply in a round)."""


@dataclass
class Federation:
    """What the ServerApp leaves behind for the caller."""

    history: list[dict[str, Any]] = field(default_factory=list)
    arrays: ArrayRecord | None = None
    clients: list[dict[str, Any]] = field(default_factory=list)  # one row per sampled client and round
    partition_counts: list[int] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    resume: RoundCheckpoint | None = None


class StrictGuard(GuardedStrategy):
    """Without simulated faults or attacks, a round where no client trained means a broken federation
    (unreadable partitions, a client bug): stop with the clients' reasons instead of skipping forever."""

    def __init__(self, *args: Any, strict: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strict = strict

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Any, Any]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        log_ = self.rounds[server_round + self.offset]
        if self.strict and not any(c["status"] == "ok" for c in log_.clients):
            reasons = "; ".join(sorted({c["reason"] for c in log_.clients})[:3]) or "no reply before the timeout"
            raise FederationError(f"round {server_round + self.offset}: none of {log_.sampled} client(s) "
                                  f"trained ({reasons})")
        return arrays, metrics


def _wait_for_nodes(grid: Grid, wanted: int, timeout_s: float) -> None:
    """Flower's node sampling waits forever for ``min_available_nodes``; give up with a message instead."""
    deadline = time.monotonic() + timeout_s
    while (found := len(list(grid.get_node_ids()))) < wanted:
        if time.monotonic() > deadline:
            raise FederationError(f"only {found} of {wanted} SuperNodes connected within {timeout_s:.0f} s")
        time.sleep(0.2)


def global_model(spec: JobSpec, manifest: dict) -> torch.nn.Module:
    return build_model(spec, manifest)


def central_evaluator(spec: JobSpec, manifest: dict, test_xy: tuple[torch.Tensor, torch.Tensor]
                      ) -> Callable[[ArrayRecord], EpochResult]:
    """Evaluate a set of global arrays on the test split with the shared loop."""
    model = global_model(spec, manifest)
    task = make_task(manifest, spec.train, manifest.get("class_counts"))
    loader = DataLoader(TensorDataset(*test_xy), batch_size=spec.train.batch_size * 4)

    def run(arrays: ArrayRecord) -> EpochResult:
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(model, loader, torch.device("cpu"), task)

    return run


def _evaluate_fn(spec: JobSpec, manifest: dict, test_xy: tuple[torch.Tensor, torch.Tensor],
                 federation: Federation, strategy: GuardedStrategy, ledger: Any,
                 on_round: Callable[[dict[str, Any]], None] | None):
    evaluate_arrays = central_evaluator(spec, manifest, test_xy)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # round 0 is the untrained initial model: not worth a test pass
        rnd = server_round + strategy.offset
        res = evaluate_arrays(arrays)
        rlog = strategy.rounds.get(rnd, RoundLog())
        row = {"round": rnd, **res.as_metrics("fed"), **rlog.metrics()}
        epsilon = ledger.epsilon_after(rnd)
        if epsilon is not None:
            row["fed/epsilon"] = float(epsilon)
        federation.history.append(row)
        federation.clients.extend(rlog.clients)
        # Checkpoint before logging: a kill in between loses no round (the resumed run re-logs nothing
        # twice, since rounds after the checkpoint are re-run and logged once).
        if federation.checkpoint_dir is not None:
            tensors, scalars = strategy_state(strategy)
            save_round(federation.checkpoint_dir, RoundCheckpoint(
                rnd, arrays.to_torch_state_dict(), federation.history, federation.clients, tensors, scalars,
                list(ledger.releases)))
        if on_round is not None:
            on_round(row)
        return MetricRecord({k.removeprefix("fed/"): float(v) for k, v in res.as_metrics("fed").items()})

    return evaluate_fn


def run_server(grid: Grid, spec: JobSpec, manifest: dict, test_xy: tuple[torch.Tensor, torch.Tensor],
               federation: Federation, on_round: Callable[[dict[str, Any]], None] | None = None,
               round_timeout_s: float | None = None, connect_timeout_s: float | None = None) -> None:
    """The ServerApp's body, apart from the app object so a ``flwr run`` app can call it too."""
    fed = spec.federated
    seed_everything(spec.train.seed)
    initial = ArrayRecord(global_model(spec, manifest).state_dict())
    sampled = num_sampled(spec)
    ledger = PrivacyLedger(spec, sampled)
    start = federation.resume.round if federation.resume else 0
    strategy = StrictGuard(wrap_strategy(build_strategy(spec), spec, sampled, ledger),
                           ReplyCheck(initial, federation.partition_counts or [2**62] * fed.clients),
                           fed.min_train_clients, seed=spec.train.seed, offset=start,
                           strict=_strict(spec))
    if federation.resume is not None:
        ck = federation.resume
        restore_strategy(strategy, ck.strategy_tensors, ck.strategy_scalars)
        ledger.releases = list(ck.privacy_releases)
        federation.history, federation.clients = list(ck.history), list(ck.clients)
        # safetensors returns keys sorted; Flower's DP wrappers pair arrays by position, so keep the model's order.
        initial = ArrayRecord({k: ck.arrays[k] for k in initial.keys()})
        federation.arrays = initial
        if start >= fed.rounds:
            return
    _wait_for_nodes(grid, fed.min_available_clients or fed.clients, connect_timeout_s or fed.connect_timeout_s)
    result = strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=fed.rounds - start,
        timeout=round_timeout_s or fed.round_timeout_s,
        train_config=ConfigRecord({"lr": client_lr(spec), "local-epochs": fed.local_epochs}),
        evaluate_fn=_evaluate_fn(spec, manifest, test_xy, federation, strategy, ledger, on_round),
    )
    # Result.arrays stays empty when every round was skipped: the global model is then the initial one.
    federation.arrays = result.arrays if len(result.arrays) else initial


def _strict(spec: JobSpec) -> bool:
    f, a = spec.federated.faults, spec.federated.attack
    return f.crash + f.timeout + f.dropout == 0 and a.kind == "none"


def make_server_app(spec: JobSpec, manifest: dict, test_xy: tuple[torch.Tensor, torch.Tensor],
                    federation: Federation, on_round: Callable[[dict[str, Any]], None] | None = None,
                    round_timeout_s: float | None = None, connect_timeout_s: float | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, spec, manifest, test_xy, federation, on_round, round_timeout_s, connect_timeout_s)

    return app
