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
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from orchard.config import JobSpec, SpecError
from orchard.console import ENGINE_LOGGERS
from orchard.data.manifest import PreparedData
from orchard.federated.dispatch import fast_dispatch
from orchard.federated.partitions import partition_summary, read_split, write_partitions, write_val_partitions
from orchard.progress import write_progress
from orchard.raystart import start_ray
from orchard.results import MetricLogger, RunResult

CHECKPOINT_ROOT = Path(".orchard/federated")  # the runner adds the MLflow run id: `--resume` finds it again
# A Ray actor that imported torch and holds a small model and its partition: an estimate (~0.5 GB
# resident), used only to keep the default concurrency inside free memory.
ACTOR_BYTES = 512 * 2**20
log = logging.getLogger("flwr")  # the engine log collects it (engine_logs_to)


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


def choose_client_cpus(cluster_cpus: float, sampled: int, free_bytes: int | None) -> tuple[float, int, str]:
    """(client_cpus, concurrent clients, why) when the spec leaves ``federated.client_cpus`` unset.

    Flower's Ray backend runs floor(cluster CPUs / client_cpus) actors. One client per CPU, but never more
    at once than are sampled per round (idle actors only cost memory), nor more than free memory holds;
    CPUs left over go to each client as threads (torch.set_num_threads), so a round of few clients on a
    big machine still uses every core.
    """
    cpus = max(1, int(cluster_cpus))
    by_memory = max(1, int(free_bytes * 0.5 // ACTOR_BYTES)) if free_bytes else cpus
    actors = max(1, min(cpus, sampled, by_memory))
    client_cpus = float(cpus // actors)
    limit = {cpus: f"{cpus} CPUs", sampled: f"{sampled} clients sampled per round",
             by_memory: f"half the free memory ({(free_bytes or 0) / 2**30:.1f} GiB free) at "
                        f"{ACTOR_BYTES / 2**20:.0f} MiB per actor"}[actors]
    return client_cpus, int(cpus // client_cpus), (
        f"federated.client_cpus={client_cpus:g} (chosen: not set in the spec): {int(cpus // client_cpus)} clients "
        f"at once on {cpus} CPUs, limited by {limit}")


def _free_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def _resolve_client_cpus(spec: JobSpec) -> JobSpec:
    """The spec with ``federated.client_cpus`` set: as given, or chosen from the running Ray's CPUs."""
    import ray

    from orchard.federated.strategies import num_sampled

    fed = spec.federated
    cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    if fed.client_cpus is not None:
        log.info("federated.client_cpus=%g (from the spec): up to %d clients at once on %g CPUs",
                 fed.client_cpus, math.floor(cpus / fed.client_cpus), cpus)
        return spec
    client_cpus, _, why = choose_client_cpus(cpus, num_sampled(spec), _free_bytes())
    log.info("%s", why)
    return spec.model_copy(update={"federated": fed.model_copy(update={"client_cpus": client_cpus})})


# After the ServerApp has returned, how long Flower may go on waiting for client calls still in flight.
RELEASE_AFTER_SERVER_S = 15.0


def _release_clients_once_server_is_done(server_done: threading.Event, returned: threading.Event) -> None:
    """Flower's simulation ends only when every in-flight client call has returned, even after its ServerApp
    has: a call whose Ray actor never answers (seen on a heavily loaded machine, all actors idle) holds
    ``run_simulation`` forever. Once the server is done and RELEASE_AFTER_SERVER_S has passed, SIGKILL the
    ClientApp actors of the local Ray this process runs (none on a cluster): their pending calls fail and
    Flower ends."""
    while not server_done.wait(1.0):
        if returned.is_set():
            return
    if returned.wait(RELEASE_AFTER_SERVER_S):
        return
    import psutil

    actors = [p for p in psutil.Process().children(recursive=True) if "ClientAppActor" in _name(p)]
    log.warning("the ServerApp finished %.0f s ago but Flower's simulation is still waiting on client calls; "
                "stopping its %d ClientApp actor(s) so that it ends", RELEASE_AFTER_SERVER_S, len(actors))
    for p in actors:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _name(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return ""


# How long a federation on an already running Ray waits for other work to free its CPUs.
FREE_CPUS_WAIT_S = 30.0


def _wait_for_free_cpus(timeout_s: float | None = None) -> None:
    """Wait until no other work holds CPUs on the Ray this process had already started, else refuse.

    Flower sizes its pool of ClientApp actors from every node's *total* CPUs and hands client calls to all
    of them: an actor that cannot be placed because other work (a notebook's actors, an earlier job whose
    CPUs Ray frees asynchronously) holds its CPUs never answers, and the simulation hangs with no error.
    """
    import time

    import ray

    timeout_s = FREE_CPUS_WAIT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    while True:
        total = float(ray.cluster_resources().get("CPU", 0))
        free = float(ray.available_resources().get("CPU", 0))
        if free >= total:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"Flower's simulation needs all {total:g} CPUs of the running Ray (it sizes its client pool "
                f"from every CPU), but {total - free:g} are still held by other work after {timeout_s:g} s: "
                "end that work (its actors or tasks) or run the federation in a fresh process")
        time.sleep(0.5)


def _simulate(spec: JobSpec, server_app, client_app_for: Callable[[JobSpec], Any], log_path: Path | None,
              server_done: threading.Event) -> None:
    from flwr.simulation import run_simulation

    from orchard.federated.actor import own_actors  # imports Ray

    fed = spec.federated
    with engine_logs_to(log_path):
        # Flower's backend reads Ray's resources from the GCS, never the state API, and its actors ask for no
        # runtime env: no API server, no agents.
        started = start_ray(task_cpus=fed.client_cpus or 0, task_setting="federated.client_cpus", lean=True)
    if not started:
        _wait_for_free_cpus()
    returned = threading.Event()
    # A local Ray's actors are this process's descendants; a cluster's are not touched.
    threading.Thread(target=_release_clients_once_server_is_done, args=(server_done, returned),
                     name="release-clients", daemon=True).start()
    try:
        # Entered after ray.init, which installs its own stderr handler on the "ray" logger.
        with engine_logs_to(log_path):
            spec = _resolve_client_cpus(spec)
            with fast_dispatch(), own_actors():
                run_simulation(server_app=server_app, client_app=client_app_for(spec),
                               num_supernodes=fed.clients,
                               backend_name="ray",
                               backend_config={"client_resources": {"num_cpus": spec.federated.client_cpus,
                                                                    "num_gpus": 0.0}})
    finally:
        returned.set()
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

    Each round's global model is scored on the validation split (``fed/val_*`` at step = round); the test
    split is scored once, on the final global model (the best round's with ``federated.early_stopping``),
    as ``test/*``. Per-round and test metrics go to ``logger`` (anything with ``log_metrics(metrics,
    step)``), the latest round to ``progress_file``, Flower's and Ray's logs to ``log_path``. With a
    ``checkpoint_dir`` every round is checkpointed there, and a federation that finds a checkpoint in it
    continues from the round after it (``orchard run --resume``). The result carries the per-client rows
    and the partition table as plain data for tracking to log.
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
    if spec.federated.client_eval:
        write_val_partitions(prepared, spec.federated, partitions)
    val_xy = split_tensors(prepared, "val")
    federation = Federation(partition_counts=list(partitions.counts), checkpoint_dir=checkpoint_dir,
                            resume=load_latest(checkpoint_dir) if checkpoint_dir is not None else None)
    if logger is not None and federation.resume is not None:
        logger.log_metrics({"fed/resumed_from": float(federation.resume.round)}, step=federation.resume.round)
    server_app = make_server_app(spec, manifest, val_xy, federation,
                                 _round_reporter(logger, progress_file, on_round),
                                 round_timeout_s=round_timeout_s, connect_timeout_s=connect_timeout_s)
    folder = partitions.folder.resolve()
    if federation.resume is None or federation.resume.round < spec.federated.rounds:
        _simulate(spec, server_app, lambda resolved: make_client_app(resolved, manifest, folder), log_path,
                  server_done=federation.done)
    else:
        restore_finished_federation(federation)
    if not federation.arrays:
        raise FederationError("the federation ended without a global model (see the engine log)")

    # The one look at the test split, after every round is done.
    test = central_evaluator(spec, manifest, split_tensors(prepared, "test"))(federation.arrays)
    model = global_model(spec, manifest)
    model.load_state_dict(federation.arrays.to_torch_state_dict())
    # The engine's metrics for the task: accuracy/f1/precision/recall, or mae/rmse/r2 for regression.
    scores = test.as_metrics("test")
    last = federation.history[-1]["round"] if federation.history else 0
    if logger is not None:
        logger.log_metrics(scores | ({"fed/best_round": float(federation.best_round)}
                                     if federation.best_round is not None else {}), step=last)
    return RunResult(model=model.eval(), history=federation.history, x="round", test=scores,
                     confusion=test.confusion, clients=federation.clients,
                     partitions=partition_summary(partitions, manifest.get("classes")),
                     extra={"best_round": federation.best_round, "stopped_round": federation.stopped_round})


def split_tensors(prepared: PreparedData, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = read_split(prepared, split)
    if not len(y):
        raise SpecError(f"data.split.{split}: the {split} split of {prepared.path} is empty; a federation scores "
                        "every round on the validation split and the final model once on the test split")
    return torch.from_numpy(x), torch.from_numpy(y)


def restore_finished_federation(federation) -> None:
    """A resumed run whose checkpoint already holds the last round: take its model and history as they are."""
    from flwr.app import ArrayRecord

    ck = federation.resume
    federation.history, federation.clients = list(ck.history), list(ck.clients)
    federation.arrays = ArrayRecord(ck.best_arrays if ck.best_arrays is not None else ck.arrays)
    if ck.best_arrays is not None and ck.stopper:
        federation.best_round = ck.stopper.get("best_epoch")
