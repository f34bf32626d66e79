"""One Tune trial: a normal Orchard train or federated job, tracked as a child run of the search's run.

Runs inside the trial's Ray actor. The data was prepared once by the driver (``prepared_path``); the
trial validates its own spec (the search's spec with the sampled values), opens an MLflow child run,
runs the engine, and reports each epoch's (Ray Train) or round's (Flower) ``val/`` metrics to Tune so
ASHA can stop it. A stopped trial's actor is killed mid-run: the driver closes its child run.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchard.config import validate_spec
from orchard.tune.space import decode

TRIAL_TAG = "orchard.tune_trial"


@dataclass(frozen=True)
class TrialContext:
    base: dict[str, Any]  # the trial spec before sampling (kind = tune.trial_kind, absolute paths)
    encoded: list[str]  # space keys whose values are JSON strings
    prepared_path: str
    parent_run_id: str
    models_dir: str  # each finished trial's model, for the driver to log the best one
    groups_dir: str  # each trial's Ray Train placement groups, removed by the driver when the trial ends
    cwd: str
    metric: str


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    from ray import tune

    from orchard.data.manifest import load_manifest
    from orchard.tracking import JobRun

    os.chdir(ctx.cwd)  # Tune starts each trial in its own folder; the spec's relative paths mean the project's
    values = decode(config, ctx.encoded)
    raw = ctx.base
    for key, value in values.items():
        raw = _with(raw, key, value)
    trial_id = tune.get_context().get_trial_id()
    spec = validate_spec(raw, origin=f"trial {trial_id}")
    prepared = load_manifest(ctx.prepared_path)
    job = JobRun(spec, run_name=f"trial-{trial_id}")
    job.set_tags({"mlflow.parentRunId": ctx.parent_run_id, TRIAL_TAG: trial_id})
    try:
        result = _train(spec, prepared, job, ctx) if spec.kind == "train" else _federate(spec, prepared, job, ctx)
        model = result.model
        params = sum(p.numel() for p in model.parameters())
        job.log_metrics({"arch/params": float(params), "arch/latency_ms_per_row": latency_ms_per_row(model, prepared)},
                        step=0)
        import torch

        Path(ctx.models_dir).mkdir(parents=True, exist_ok=True)
        torch.save(model, Path(ctx.models_dir) / f"{trial_id}.pt")
    except BaseException as exc:
        # Tune's stop (the scheduler's decision) arrives as sys.exit in this thread, or as the engine failing
        # once its Tune bridge is gone: either way the trial was stopped, not broken.
        stopped = isinstance(exc, SystemExit) or _stopping() or _closed_by_driver(job)
        if stopped:
            job.set_tags({"orchard.tune_stopped": "early (scheduler)"})
        job.finish("KILLED" if stopped else "FAILED")
        raise
    job.finish("FINISHED")


def _closed_by_driver(job) -> bool:
    """The search already ended and marked this stopped trial KILLED: an engine failing as its Ray Train
    workers are taken down must not overwrite that."""
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(job.uri).get_run(job.run_id).info.status == "KILLED"
    except Exception:  # noqa: BLE001 - the tracking server is out of reach: report what happened here
        return False


def _stopping() -> bool:
    from ray.train._internal.session import get_session

    session = get_session()
    return bool(session is not None and session.stop_event.is_set())


def _with(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(raw)
    node = out
    *parents, last = key.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value
    return out


def _train(spec, prepared, job, ctx: TrialContext):
    from ray import tune

    from orchard.train import run_training

    return run_training(spec, prepared, job.logger, run_name=f"{spec.name}-{job.run_id}",
                        callbacks=[_tune_reporter(ctx.metric),
                                   _group_recorder(Path(ctx.groups_dir) / tune.get_context().get_trial_id())])


def _group_recorder(folder: Path):
    """Writes the id of each worker group's placement group. Ray Train's own cleaner, which removes it when
    the controller dies (a trial the scheduler stopped), needs the state API and so a dashboard, which
    Orchard's local Ray does not start: without this, every stopped trial would keep its workers' CPUs."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class RecordGroups(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group):
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            folder.mkdir(parents=True, exist_ok=True)
            (folder / pg.id.hex()).touch()

    return RecordGroups()


def _tune_reporter(metric: str):
    """Ray Train's Tune bridge, passing on only the epoch reports: the last report holds test figures only,
    and Tune refuses a result without the metric it optimises."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return EpochsToTune()


def _federate(spec, prepared, job, ctx: TrialContext):
    from ray import tune

    from orchard.federated import run_federated

    def on_round(row: dict[str, Any]) -> None:
        # fed/val_accuracy is the global model on the validation split: the search's val/accuracy.
        val = {"val/" + k.removeprefix("fed/val_"): v for k, v in row.items() if k.startswith("fed/val_")}
        if ctx.metric in val:
            tune.report({**val, "round": row["round"]})

    with _ray_kept(), _clients_outside_trial_group():
        return run_federated(spec, prepared, job.logger, on_round=on_round)


@contextlib.contextmanager
def _ray_kept():
    """Flower's Ray backend calls ray.shutdown() when a simulation ends; in a Tune trial that would cut the
    trial's own actor off Ray. Its client actors are terminated by the backend before that call."""
    import ray

    shutdown = ray.shutdown
    ray.shutdown = lambda *a, **k: None
    try:
        yield
    finally:
        ray.shutdown = shutdown


@contextlib.contextmanager
def _clients_outside_trial_group():
    """Flower sizes its client-actor pool to the whole Ray cluster (CPUs / client_cpus) and hangs on an actor
    that never starts; Tune would place those actors inside the trial's placement group, which holds none.
    So they go to the cluster, and federated trials run one at a time (config refuses more)."""
    from ray._private.worker import Worker

    saved = Worker.should_capture_child_tasks_in_placement_group
    Worker.should_capture_child_tasks_in_placement_group = property(lambda self: False)
    try:
        yield
    finally:
        Worker.should_capture_child_tasks_in_placement_group = saved


def latency_ms_per_row(model, prepared, rows: int = 256, repeats: int = 5) -> float:
    """CPU inference time of ``model`` per row: the median of ``repeats`` passes over up to ``rows`` test
    rows, on one thread (comparable across trials that run side by side)."""
    import numpy as np
    import torch

    from orchard.data.manifest import read_head

    x = torch.from_numpy(np.asarray(read_head(prepared, "test", rows), dtype=np.float32))
    model = model.cpu().eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            model(x)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return float(np.median(times)) * 1000 / len(x)
