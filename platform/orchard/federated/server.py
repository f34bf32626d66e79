"""The ServerApp: the spec's strategy over validated replies, the global model evaluated centrally each round.

Each round the global model is scored on the VALIDATION split (``fed/val_*``), never the test split: the
caller tests once, on the final global model (or the best round's, with ``federated.early_stopping``), so
no round or setting is chosen on test figures.

``Federation`` is the driver-side record of the federation: the ServerApp runs in a thread of the
calling process under ``run_simulation``, so it fills this object in place (arrays, per-round history,
per-client rows, round checkpoints) and the caller reads the final arrays and history from it afterwards.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from torch.utils.data import DataLoader, TensorDataset

from orchard.config import JobSpec
from orchard.engine import EpochResult, evaluate, make_task, seed_everything
from orchard.engine.early_stopping import EarlyStopper
from orchard.federated.checkpoint import RoundCheckpoint, restore_strategy, save_round, strategy_state
from orchard.federated.privacy import PrivacyLedger, wrap_strategy
from orchard.federated.strategies import (
    METRICS_KEY,
    GuardedStrategy,
    ReplyCheck,
    RoundLog,
    build_strategy,
    client_lr,
    num_sampled,
)
from orchard.models import build_model

logger = logging.getLogger("flwr")  # the engine log (simulation.engine_logs_to) collects this logger


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
    # federated.early_stopping: the best round by the watched fed/val_* metric and its global arrays.
    best_round: int | None = None
    best_arrays: dict[str, torch.Tensor] | None = None
    stopped_round: int | None = None  # set when early stopping ended the federation before federated.rounds
    done: threading.Event = field(default_factory=threading.Event)  # the ServerApp's body has returned


class _EarlyStop(Exception):  # noqa: N818 - control flow out of Flower's round loop, not an error
    """Raised from the per-round evaluation to leave ``Strategy.start`` when validation stopped improving."""


class StrictGuard(GuardedStrategy):
    """Without simulated faults or attacks, a round where no client trained means a broken federation
    (unreadable partitions, a client bug): stop with the clients' reasons instead of skipping forever."""

    def __init__(self, *args: Any, strict: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strict = strict
        self.client_evals: dict[int, dict[str, float]] = {}  # round -> fed/client_eval_* figures

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Federated evaluation (``federated.client_eval``), scored here rather than by the inner strategy:
        Flower keeps only weighted means (the worst decile needs each client's figure) and aborts the
        ServerApp on one inconsistent reply, where a bad evaluation reply should only be left out."""
        scores = client_eval_scores(replies)
        self.client_evals[server_round + self.offset] = scores
        return MetricRecord({k.removeprefix("fed/"): v for k, v in scores.items()}) if scores else None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Any, Any]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        log_ = self.rounds[server_round + self.offset]
        if self.strict and not any(c["status"] == "ok" for c in log_.clients):
            reasons = "; ".join(sorted({c["reason"] for c in log_.clients})[:3]) or "no reply before the timeout"
            raise FederationError(f"round {server_round + self.offset}: none of {log_.sampled} client(s) "
                                  f"trained ({reasons})")
        return arrays, metrics


class StreamingGrid(Grid):
    """A grid whose ``send_and_receive`` yields each reply as it is pulled, not a list once all are in.

    The instructions are pushed at the call, as Flower's grids do (the strategy reads their message ids
    before it reads a reply); replies are then pulled every ``pull_interval`` (the wrapped grid's: 0.1 s
    in simulation, 3 s against a SuperLink) until all have come or ``timeout`` has passed, the same
    loop as Flower's. A strategy that folds replies as they come (``GuardedStrategy._fold``) then holds
    one at a time; one that needs them all makes its own list.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.grid.push_messages(messages))
        return self._replies(pending, timeout)

    def _replies(self, pending: set[str], timeout: float | None) -> Iterator[Message]:
        end = time.time() + (timeout if timeout is not None else 0.0)
        interval = float(getattr(self.grid, "pull_interval", 3.0))
        while timeout is None or time.time() < end:
            for msg in self.grid.pull_messages(pending):
                pending.discard(msg.metadata.reply_to_message_id)
                yield msg
            if not pending:
                return
            time.sleep(interval)


def _wait_for_nodes(grid: Grid, wanted: int, timeout_s: float) -> None:
    """Flower's node sampling waits forever for ``min_available_nodes``; give up with a message instead."""
    deadline = time.monotonic() + timeout_s
    while (found := len(list(grid.get_node_ids()))) < wanted:
        if time.monotonic() > deadline:
            raise FederationError(f"only {found} of {wanted} SuperNodes connected within {timeout_s:.0f} s")
        time.sleep(0.2)


def global_model(spec: JobSpec, manifest: dict) -> torch.nn.Module:
    return build_model(spec, manifest)


def central_evaluator(spec: JobSpec, manifest: dict, xy: tuple[torch.Tensor, torch.Tensor]
                      ) -> Callable[[ArrayRecord], EpochResult]:
    """Evaluate a set of global arrays on one split (validation per round, test once) with the shared loop."""
    model = global_model(spec, manifest)
    task = make_task(manifest, spec.train, manifest.get("class_counts"))
    loader = DataLoader(TensorDataset(*xy), batch_size=spec.train.batch_size * 4)

    def run(arrays: ArrayRecord) -> EpochResult:
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(model, loader, torch.device("cpu"), task)

    return run


def val_metrics(res: EpochResult) -> dict[str, float]:
    """The per-round central figures: ``fed/val_loss``, ``fed/val_accuracy``, ``fed/val_f1``, ..."""
    return {f"fed/val_{k.split('/', 1)[1]}": v for k, v in res.as_metrics("val").items()}


def client_eval_scores(replies: Iterable[Message]) -> dict[str, float]:
    """Weighted mean loss/accuracy and the 10th-percentile client accuracy over valid evaluation replies.

    A reply counts when it has a finite loss, an accuracy in [0, 1] (classification) and num-examples > 0;
    clients holding no validation rows reply with 0 and are left out.
    """
    rows = []
    for msg in replies:
        if msg.has_error() or METRICS_KEY not in msg.content.metric_records:
            continue
        m = msg.content[METRICS_KEY]
        n, loss, acc = m.get("num-examples"), m.get("loss"), m.get("accuracy")
        if not isinstance(n, int | float) or n <= 0 or not isinstance(loss, int | float) or not math.isfinite(loss):
            continue
        if acc is not None and (not isinstance(acc, int | float) or not 0 <= acc <= 1):
            continue
        rows.append((float(n), float(loss), None if acc is None else float(acc)))
    if not rows:
        return {}
    n = np.array([r[0] for r in rows])
    out = {"fed/client_eval_clients": float(len(rows)),
           "fed/client_eval_loss": float(np.average([r[1] for r in rows], weights=n))}
    if all(r[2] is not None for r in rows):
        acc = np.array([r[2] for r in rows])
        out["fed/client_eval_accuracy"] = float(np.average(acc, weights=n))
        out["fed/client_eval_p10_accuracy"] = float(np.percentile(acc, 10))  # worst decile: fairness
    return out


def _evaluate_fn(spec: JobSpec, manifest: dict, val_xy: tuple[torch.Tensor, torch.Tensor],
                 federation: Federation, strategy: StrictGuard, ledger: Any, stopper: EarlyStopper,
                 on_round: Callable[[dict[str, Any]], None] | None):
    evaluate_arrays = central_evaluator(spec, manifest, val_xy)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # round 0 is the untrained initial model: not worth an evaluation pass
        rnd = server_round + strategy.offset
        res = evaluate_arrays(arrays)
        rlog = strategy.rounds.get(rnd, RoundLog())
        row = {"round": rnd, **val_metrics(res), **rlog.metrics(), **strategy.client_evals.get(rnd, {})}
        epsilon = ledger.epsilon_after(rnd)
        if epsilon is not None:
            row["fed/epsilon"] = float(epsilon)
        federation.history.append(row)
        federation.clients.extend(rlog.clients)
        if stopper.update(row, rnd):
            federation.best_round = rnd
            federation.best_arrays = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
        # Checkpoint before logging: a kill in between loses no round (the resumed run re-logs nothing
        # twice, since rounds after the checkpoint are re-run and logged once).
        if federation.checkpoint_dir is not None:
            tensors, scalars = strategy_state(strategy)
            save_round(federation.checkpoint_dir, RoundCheckpoint(
                rnd, arrays.to_torch_state_dict(), federation.history, federation.clients, tensors, scalars,
                list(ledger.releases), best_arrays=federation.best_arrays, stopper=stopper.state()))
        if on_round is not None:
            on_round(row)
        if stopper.should_stop and rnd < spec.federated.rounds:
            federation.stopped_round = rnd
            raise _EarlyStop
        return MetricRecord({k.removeprefix("fed/"): float(v) for k, v in val_metrics(res).items()})

    return evaluate_fn


def run_server(grid: Grid, spec: JobSpec, manifest: dict, val_xy: tuple[torch.Tensor, torch.Tensor],
               federation: Federation, on_round: Callable[[dict[str, Any]], None] | None = None,
               round_timeout_s: float | None = None, connect_timeout_s: float | None = None) -> None:
    """The ServerApp's body, apart from the app object so a ``flwr run`` app can call it too.

    ``val_xy`` is the validation split, scored centrally after every round.
    """
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
    stopper = EarlyStopper(fed.early_stopping)
    if federation.resume is not None:
        ck = federation.resume
        restore_strategy(strategy, ck.strategy_tensors, ck.strategy_scalars)
        stopper.load_state(ck.stopper)
        federation.best_round, federation.best_arrays = stopper.best_epoch, ck.best_arrays
        ledger.releases = list(ck.privacy_releases)
        federation.history, federation.clients = list(ck.history), list(ck.clients)
        # safetensors returns keys sorted; Flower's DP wrappers pair arrays by position, so keep the model's order.
        initial = ArrayRecord({k: ck.arrays[k] for k in initial.keys()})
        federation.arrays = initial
        if start >= fed.rounds:
            _keep_best(federation, initial)
            return
    _wait_for_nodes(grid, fed.min_available_clients or fed.clients, connect_timeout_s or fed.connect_timeout_s)
    evaluate_fn = _evaluate_fn(spec, manifest, val_xy, federation, strategy, ledger, stopper, on_round)
    try:
        result = strategy.start(
            grid=StreamingGrid(grid), initial_arrays=initial, num_rounds=fed.rounds - start,
            timeout=round_timeout_s or fed.round_timeout_s,
            train_config=ConfigRecord({"lr": client_lr(spec), "local-epochs": fed.local_epochs}),
            evaluate_fn=evaluate_fn,
        )
        # Result.arrays stays empty when every round was skipped: the global model is then the initial one.
        federation.arrays = result.arrays if len(result.arrays) else initial
    except _EarlyStop:
        logger.info("early stopping after round %d: %s has not improved for %d round(s); best round %s",
                    federation.stopped_round, fed.early_stopping.metric, fed.early_stopping.patience,
                    federation.best_round)
    _keep_best(federation, initial)


def _keep_best(federation: Federation, initial: ArrayRecord) -> None:
    """With early stopping the best round's global model is the result (tested, returned, logged)."""
    if federation.best_arrays is not None:
        federation.arrays = ArrayRecord({k: federation.best_arrays[k] for k in initial.keys()})


def _strict(spec: JobSpec) -> bool:
    f, a = spec.federated.faults, spec.federated.attack
    return f.crash + f.timeout + f.dropout == 0 and a.kind == "none"


def make_server_app(spec: JobSpec, manifest: dict, val_xy: tuple[torch.Tensor, torch.Tensor],
                    federation: Federation, on_round: Callable[[dict[str, Any]], None] | None = None,
                    round_timeout_s: float | None = None, connect_timeout_s: float | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_server(grid, spec, manifest, val_xy, federation, on_round, round_timeout_s, connect_timeout_s)
        finally:
            federation.done.set()

    return app
