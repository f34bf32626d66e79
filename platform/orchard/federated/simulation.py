"""Run a federated job as a Flower simulation on Ray: partition → simulate → evaluate → log.

The ServerApp runs in a thread of this process and the ClientApps in Ray actors. Ray is started here
(not inside Flower) so that a Ray that cannot start, or a cluster too small for one client, fails
before Flower's threads exist: once they do, a ServerApp waiting for replies that never come holds the
process until its round timeout. Flower shuts Ray down when the simulation ends, including a Ray the
caller had started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchard.config import JobSpec
from orchard.data.manifest import PreparedData
from orchard.engine import EpochResult
from orchard.federated.partitions import PartitionSet, read_split, write_partitions

CHECKPOINT_ROOT = Path(".orchard/federated")  # + MLflow run id: `orchard run --resume` finds it again
CLIENTS_TABLE = "federated/clients.json"
ENGINE_LOGGERS = ("flwr", "ray")


@dataclass
class FederatedResult:
    model: nn.Module  # the final global model, on CPU
    history: list[dict[str, Any]]  # one row per round: round, fed/accuracy, fed/loss, fed/clients, fed/failed, ...
    test: EpochResult  # the final global model on the test split, with .confusion
    partition_counts: list[int]  # training rows held by each client
    partitions: PartitionSet | None = None
    clients: list[dict[str, Any]] | None = None  # one row per sampled client and round (status, loss, reason)


def _file_handler(log_path: Path) -> logging.Handler:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setLevel(logging.INFO)  # flwr's logger is at DEBUG; its console handler filtered at INFO
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def _warnings_to(handler: logging.Handler):
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        handler.handle(logging.makeLogRecord(
            {"name": "py.warnings", "levelno": logging.WARNING, "levelname": "WARNING", "msg": text}))

    return show


@contextlib.contextmanager
def engine_logs_to(log_path: Path | None) -> Iterator[None]:
    """Flower's and Ray's loggers and Python warnings go to ``log_path``, not the terminal (no-op if None)."""
    if log_path is None:
        yield
        return
    handler = _file_handler(log_path)
    saved = []
    for name in ENGINE_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate))
        lg.handlers, lg.propagate = [handler], False
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warnings_to(handler)
            yield
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()


def start_ray(client_cpus: float) -> bool:
    """Start a quiet local Ray unless one is running (then Flower reuses it). True if started here."""
    import ray

    started = False
    if not ray.is_initialized():
        # As Flower's RayBackend does: actors must import orchard from wherever this process does.
        pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        started = True
    biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if biggest < client_cpus:
        if started:
            ray.shutdown()
        raise ValueError(f"federated.client_cpus={client_cpus:g}, but no Ray node has more than "
                         f"{biggest:g} CPUs: no client could run")
    return started


def _round_logger(job, progress_file: Path | None, hook: Callable[[dict[str, Any]], None] | None = None
                  ) -> Callable[[dict[str, Any]], None]:
    def on_round(row: dict[str, Any]) -> None:
        metrics = {k: v for k, v in row.items() if k != "round"}
        if job is not None:
            job.log_metrics(metrics, step=row["round"])
        if progress_file is not None:
            progress_file.write_text(json.dumps(row))
        if hook is not None:
            hook(row)

    return on_round


def _simulate(spec: JobSpec, server_app, client_app, log_path: Path | None) -> None:
    from flwr.simulation import run_simulation

    fed = spec.federated
    with engine_logs_to(log_path):
        started = start_ray(fed.client_cpus)
    try:
        # Entered after ray.init, which installs its own stderr handler on the "ray" logger.
        with engine_logs_to(log_path):
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=fed.clients,
                           backend_name="ray",
                           backend_config={"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": 0.0}})
    finally:
        # Flower shuts Ray down when its backend ends; this covers a failure before that point.
        if started:
            import ray

            ray.shutdown()


def _log_test(job, test: EpochResult, partitions: PartitionSet, clients: list[dict[str, Any]],
              classes: list | None) -> None:
    from orchard.tracking.federated import log_partitions

    # The engine's metrics for the task: accuracy/f1/precision/recall, or mae/rmse/r2 for regression.
    job.log_metrics(test.as_metrics("test"), step=0)
    log_partitions(job, partitions, classes)  # rows and label histogram per client: table + plot
    # Per-client figures as ONE table (MLflow's table JSON: columns + data) rather than client/<id>/*
    # metrics: 100 clients x 5 keys would bury the fed/* charts in the UI's metric list, and a table
    # keeps the status and rejection reason next to each loss.
    columns = ["round", "client", "node", "status", "train_loss", "num_examples", "reason"]
    job.log_text(json.dumps({"columns": columns, "data": [[c.get(k) for k in columns] for c in clients]}),
                 CLIENTS_TABLE)


def checkpoint_dir(job) -> Path | None:
    return CHECKPOINT_ROOT / job.run_id if job is not None else None


def run_federated(spec: JobSpec, prepared: PreparedData, job=None, log_path: Path | None = None, *,
                  round_timeout_s: float | None = None, connect_timeout_s: float | None = None,
                  on_round: Callable[[dict[str, Any]], None] | None = None) -> FederatedResult:
    """Federate ``spec`` over ``prepared``; log per-round and test metrics to ``job`` (a JobRun) if given.

    With a job, every round is checkpointed under ``.orchard/federated/<run id>``; when a checkpoint
    exists for ``job.run_id`` (``orchard run --resume``), the federation continues from the round after it.
    """
    from orchard.federated.checkpoint import load_latest
    from orchard.federated.client import make_client_app
    from orchard.federated.server import (
        Federation,
        FederationError,
        central_evaluator,
        global_model,
        make_server_app,
    )
    from orchard.federated.strategies import check_strategy

    check_strategy(spec)  # impossible strategy settings fail before any process starts
    manifest = prepared.manifest
    partitions = write_partitions(prepared, spec.federated)
    x_test, y_test = read_split(prepared, "test")
    test_xy = (torch.from_numpy(x_test), torch.from_numpy(y_test))
    ckpt_dir = checkpoint_dir(job)
    federation = Federation(partition_counts=list(partitions.counts), checkpoint_dir=ckpt_dir,
                            resume=load_latest(ckpt_dir) if ckpt_dir is not None else None)
    if job is not None and federation.resume is not None:
        job.log_metrics({"fed/resumed_from": float(federation.resume.round)}, step=federation.resume.round)
    progress_file = log_path.parent / "progress.json" if log_path is not None else None
    server_app = make_server_app(spec, manifest, test_xy, federation, _round_logger(job, progress_file, on_round),
                                 round_timeout_s=round_timeout_s, connect_timeout_s=connect_timeout_s)
    client_app = make_client_app(spec, manifest, partitions.folder.resolve())
    if federation.resume is None or federation.resume.round < spec.federated.rounds:
        _simulate(spec, server_app, client_app, log_path)
    else:
        server_app_body_done(federation)
    if not federation.arrays:
        raise FederationError("the federation ended without a global model (see the engine log)")

    test = central_evaluator(spec, manifest, test_xy)(federation.arrays)
    model = global_model(spec, manifest)
    model.load_state_dict(federation.arrays.to_torch_state_dict())
    if job is not None:
        _log_test(job, test, partitions, federation.clients, manifest.get("classes"))
    return FederatedResult(model=model.eval(), history=federation.history, test=test,
                           partition_counts=partitions.counts, partitions=partitions, clients=federation.clients)


def server_app_body_done(federation) -> None:
    """A resumed run whose checkpoint already holds the last round: nothing left to federate."""
    from flwr.app import ArrayRecord

    ck = federation.resume
    federation.history, federation.clients = list(ck.history), list(ck.clients)
    federation.arrays = ArrayRecord(ck.arrays)
