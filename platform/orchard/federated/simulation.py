"""Run a federated job as a Flower simulation on Ray: partition → simulate → evaluate → return the result.

The ServerApp runs in a thread of this process and the ClientApps in Ray actors. Ray is started here
(not inside Flower) so that a Ray that cannot start, or a cluster too small for one client, fails
before Flower's threads exist: once they do, a ServerApp waiting for replies that never come holds the
process until its round timeout. Flower shuts Ray down when the simulation ends, including a Ray the
caller had started.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from orchard.config import JobSpec
from orchard.console import ENGINE_LOGGERS
from orchard.data.manifest import PreparedData
from orchard.federated.partitions import partition_summary, read_split, write_partitions
from orchard.progress import write_progress
from orchard.raystart import start_ray
from orchard.results import MetricLogger, RunResult

CHECKPOINT_ROOT = Path(".orchard/federated")  # the runner adds the MLflow run id: `--resume` finds it again


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


def _round_reporter(logger: MetricLogger | None, progress_file: Path | None,
                    hook: Callable[[dict[str, Any]], None] | None = None) -> Callable[[dict[str, Any]], None]:
    def on_round(row: dict[str, Any]) -> None:
        if logger is not None:
            logger.log_metrics({k: v for k, v in row.items() if k != "round"}, step=row["round"])
        if progress_file is not None:
            write_progress(progress_file, row)
        if hook is not None:
            hook(row)

    return on_round


def _simulate(spec: JobSpec, server_app, client_app, log_path: Path | None) -> None:
    from flwr.simulation import run_simulation

    fed = spec.federated
    with engine_logs_to(log_path):
        started = start_ray(task_cpus=fed.client_cpus, task_setting="federated.client_cpus")
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


def run_federated(spec: JobSpec, prepared: PreparedData, logger: MetricLogger | None = None, *,
                  checkpoint_dir: Path | None = None, progress_file: Path | None = None,
                  log_path: Path | None = None, round_timeout_s: float | None = None,
                  connect_timeout_s: float | None = None,
                  on_round: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Federate ``spec`` over ``prepared`` and return the global model, its history and test figures.

    Per-round and test metrics go to ``logger`` (anything with ``log_metrics(metrics, step)``), the latest
    round to ``progress_file``, Flower's and Ray's logs to ``log_path``. With a ``checkpoint_dir`` every
    round is checkpointed there, and a federation that finds a checkpoint in it continues from the round
    after it (``orchard run --resume``). The result carries the per-client rows and the partition table
    as plain data for tracking to log.
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
    federation = Federation(partition_counts=list(partitions.counts), checkpoint_dir=checkpoint_dir,
                            resume=load_latest(checkpoint_dir) if checkpoint_dir is not None else None)
    if logger is not None and federation.resume is not None:
        logger.log_metrics({"fed/resumed_from": float(federation.resume.round)}, step=federation.resume.round)
    server_app = make_server_app(spec, manifest, test_xy, federation,
                                 _round_reporter(logger, progress_file, on_round),
                                 round_timeout_s=round_timeout_s, connect_timeout_s=connect_timeout_s)
    client_app = make_client_app(spec, manifest, partitions.folder.resolve())
    if federation.resume is None or federation.resume.round < spec.federated.rounds:
        _simulate(spec, server_app, client_app, log_path)
    else:
        restore_finished_federation(federation)
    if not federation.arrays:
        raise FederationError("the federation ended without a global model (see the engine log)")

    test = central_evaluator(spec, manifest, test_xy)(federation.arrays)
    model = global_model(spec, manifest)
    model.load_state_dict(federation.arrays.to_torch_state_dict())
    # The engine's metrics for the task: accuracy/f1/precision/recall, or mae/rmse/r2 for regression.
    scores = test.as_metrics("test")
    if logger is not None:
        logger.log_metrics(scores, step=0)
    return RunResult(model=model.eval(), history=federation.history, x="round", test=scores,
                     confusion=test.confusion, clients=federation.clients,
                     partitions=partition_summary(partitions, manifest.get("classes")))


def restore_finished_federation(federation) -> None:
    """A resumed run whose checkpoint already holds the last round: take its model and history as they are."""
    from flwr.app import ArrayRecord

    ck = federation.resume
    federation.history, federation.clients = list(ck.history), list(ck.clients)
    federation.arrays = ArrayRecord(ck.arrays)
