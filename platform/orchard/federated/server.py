"""The ServerApp: FedAvg over the clients' replies, the global model evaluated centrally each round.

``RoundStats`` is the driver-side record of the federation: the ServerApp runs in a thread of the
calling process under ``run_simulation``, so it fills this object in place and the caller reads the
final arrays and the per-round history from it afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from torch.utils.data import DataLoader, TensorDataset

from orchard.config import JobSpec
from orchard.engine import EpochResult, evaluate, make_task, seed_everything
from orchard.models import model_from_manifest


class FederationError(RuntimeError):
    """The federation cannot make progress (no clients, or no client reply in a round)."""


@dataclass
class Federation:
    """What the ServerApp leaves behind for the caller."""

    history: list[dict[str, Any]] = field(default_factory=list)
    arrays: ArrayRecord | None = None
    train_stats: dict[int, dict[str, float]] = field(default_factory=dict)


class OrchardFedAvg(FedAvg):
    """FedAvg that records each round's participation and refuses to go on when no client replied."""

    def __init__(self, federation: Federation, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.federation = federation

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        if len(failed) == len(replies):
            reasons = "; ".join(sorted({m.error.reason or "" for m in failed})[:3]) or "no reply before the timeout"
            raise FederationError(f"round {server_round}: none of {len(replies)} client(s) trained ({reasons})")
        if failed:
            log(WARNING, "round %d: %d client(s) failed: %s", server_round, len(failed), failed[0].error.reason)
        arrays, metrics = super().aggregate_train(server_round, replies)
        # FedAvg's MetricRecord aggregation already weights train_loss by num-examples.
        self.federation.train_stats[server_round] = {
            "fed/client_train_loss": float(metrics["train_loss"]) if metrics else float("nan"),
            "fed/clients": float(len(replies) - len(failed)),
        }
        return arrays, metrics


def _wait_for_nodes(grid: Grid, wanted: int, timeout_s: float) -> None:
    """Flower's node sampling waits forever for ``min_available_nodes``; give up with a message instead."""
    deadline = time.monotonic() + timeout_s
    while (found := len(list(grid.get_node_ids()))) < wanted:
        if time.monotonic() > deadline:
            raise FederationError(f"only {found} of {wanted} SuperNodes connected within {timeout_s:.0f} s")
        time.sleep(0.2)


def global_model(spec: JobSpec, manifest: dict) -> torch.nn.Module:
    return model_from_manifest(spec.model, manifest, spec.data.sequence_shape, spec.train.loss)


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
                 federation: Federation, on_round: Callable[[dict[str, Any]], None] | None):
    evaluate_arrays = central_evaluator(spec, manifest, test_xy)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # round 0 is the untrained initial model: not worth a test pass
        res = evaluate_arrays(arrays)
        row = {"round": server_round, **res.as_metrics("fed"), **federation.train_stats.get(server_round, {})}
        federation.history.append(row)
        if on_round is not None:
            on_round(row)
        return MetricRecord({k.removeprefix("fed/"): float(v) for k, v in res.as_metrics("fed").items()})

    return evaluate_fn


def run_server(grid: Grid, spec: JobSpec, manifest: dict, test_xy: tuple[torch.Tensor, torch.Tensor],
               federation: Federation, on_round: Callable[[dict[str, Any]], None] | None = None,
               round_timeout_s: float = 600.0, connect_timeout_s: float = 120.0) -> None:
    """The ServerApp's body, apart from the app object so a ``flwr run`` app can call it too."""
    fed = spec.federated
    # Client sampling uses the global `random`; seeding it makes fraction_train < 1 reproducible.
    seed_everything(spec.train.seed)
    model = global_model(spec, manifest)
    strategy = OrchardFedAvg(federation, fraction_train=fed.fraction_train, fraction_evaluate=0.0,
                             min_train_nodes=1, min_available_nodes=fed.clients)
    _wait_for_nodes(grid, fed.clients, connect_timeout_s)
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=fed.rounds,
        timeout=round_timeout_s,
        train_config=ConfigRecord({"lr": spec.train.lr, "local-epochs": fed.local_epochs}),
        evaluate_fn=_evaluate_fn(spec, manifest, test_xy, federation, on_round),
    )
    federation.arrays = result.arrays


def make_server_app(spec: JobSpec, manifest: dict, test_xy: tuple[torch.Tensor, torch.Tensor],
                    federation: Federation, on_round: Callable[[dict[str, Any]], None] | None = None,
                    round_timeout_s: float = 600.0, connect_timeout_s: float = 120.0) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, spec, manifest, test_xy, federation, on_round, round_timeout_s, connect_timeout_s)

    return app
