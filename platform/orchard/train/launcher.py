"""Driver side of a Ray Train job: start Ray, stream the prepared Parquet, fit, collect the result.

Metrics reach the caller's logger (tracking's picklable ``RunLogger``, in practice) through a
``UserCallback`` that runs on the Ray Train controller: workers never open MLflow runs, so a restarted
worker group cannot duplicate one. The result goes back to the caller; this package never sees MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from orchard.config import JobSpec
from orchard.data.manifest import PreparedData, read_labels
from orchard.engine.checkpoint import load_checkpoint
from orchard.models import build_model
from orchard.progress import read_progress, write_progress
from orchard.raystart import prestart_when_up, settle_early_start, start_ray, training_cpus
from orchard.results import MetricLogger, RunResult

log = logging.getLogger("orchard.train")


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    DataContext.get_current().print_on_execution_start = False


def _warn_node_local_storage(storage_path: str) -> None:
    """Checkpoints on a node-local folder of a multi-node cluster cannot be restored on another node."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 and "://" not in storage_path:
        log.warning("scaling.storage_path=%s is a local folder, but this Ray cluster has %d nodes: a worker "
                    "restarted on another node cannot read its checkpoints. Point it at shared storage "
                    "(s3://, gs://, hdfs://, or an NFS mount present on every node)", storage_path, nodes)


def _use_gpu(spec: JobSpec) -> bool:
    import ray

    if spec.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(spec.scaling.use_gpu)


def _progress_callback(logger: MetricLogger | None, progress_file: Path | None):
    from ray.train import UserCallback

    class ReportToLogger(UserCallback):
        """Runs on the controller after every report: rank 0's metrics go to the logger and progress file."""

        first_report_at: float | None = None

        def after_report(self, run_context, metrics, checkpoint):
            now = time.time()  # wall clock: the controller is another process; the driver reads these
            self.first_report_at = self.first_report_at or now
            m = dict(metrics[0])
            step = int(m.pop("epoch", 0))
            if logger is not None:
                logger.log_metrics({k: v for k, v in m.items() if isinstance(v, int | float)}, step)
            if progress_file is not None:
                write_progress(progress_file, {"epoch": step, **m, "first_report_at": self.first_report_at,
                                               "report_at": now})

    return ReportToLogger()


def _restart_counter(logger: MetricLogger | None):
    """Runs on the controller: each worker-group restart is logged as ``train/restarts`` (1, 2, ...)."""
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision

    class CountRestarts(ControllerCallback):
        restarts = 0

        def before_controller_execute_failure_decision(self, failure_decision):
            if failure_decision == FailureDecision.RETRY:
                self.restarts += 1
                if logger is not None:
                    logger.log_metrics({"train/restarts": self.restarts}, self.restarts)

    return CountRestarts()


# Ray Train V2 reads these on the controller and its workers, passed from the driver's environment at fit().
_HEALTH_CHECK_ENV = "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"  # a worker whose status poll hangs is dead
_BARRIER_ENV = "RAY_TRAIN_COLLECTIVE_TIMEOUT_S"  # ray.train.report's barrier (Ray's default: no timeout)
# How often the controller polls its workers: it learns that training ended (or a worker died) only at a
# poll, so Ray's 2 s default added ~2 s to every run's end; a poll is one small actor call per worker.
_POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 0.25


@contextmanager
def _train_env(seconds: float):
    """Bound every wait on another rank: a stopped or deadlocked rank fails the worker group after
    ``seconds`` instead of stalling it forever; and poll workers often. Values the user exported win."""
    wanted = {_HEALTH_CHECK_ENV: str(seconds), _BARRIER_ENV: str(seconds), _POLL_ENV: str(POLL_S)}
    added = [k for k in wanted if k not in os.environ]
    for k in added:
        os.environ[k] = wanted[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


# Ray runs the function this env var names as a training worker's process starts (the env var that Ray's
# ``worker_process_setup_hook`` runtime-env field becomes): a worker pre-started for a run has imported
# torch, Ray Train and the training loop before the run asks for it.
_SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"  # ray._private.ray_constants
WORKER_ENV_VARS = {_SETUP_HOOK_ENV: "orchard.train.worker.preload"}
# The actors a run's controller creates in its own runtime env: its placement-group cleaner and its
# synchronization actor.
_CONTROLLER_HELPERS = 2


def run_envs(spec: JobSpec) -> list[tuple[str, int]]:
    """The runtime envs, as Ray will serialize them, of the processes a run's ``fit()`` starts, with how
    many of each, in the order it needs them: the controller, the training workers, the controller's
    helpers (what ``raystart.prestart_workers`` is given; see ``prewarm``).

    The controller gets the driver's Ray Train variables plus one of Ray's (``DataParallelTrainer``), as
    ``RuntimeEnv.serialize`` writes them (sorted JSON); a helper created without an env inherits the
    controller's string as is. A training worker's env is the controller's merged with
    ``WORKER_ENV_VARS`` by the controller's C++ core worker, which writes JSON with no spaces.
    """
    from ray.runtime_env import RuntimeEnv
    from ray.train.v2._internal.constants import (
        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
        RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
        get_env_vars_to_propagate,
    )

    with _train_env(spec.scaling.collective_timeout_s):
        env = get_env_vars_to_propagate()
    env.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    workers = json.dumps({"env_vars": {**env, **WORKER_ENV_VARS}}, sort_keys=True, separators=(",", ":"))
    controller = RuntimeEnv(env_vars=env).serialize()
    return [(controller, 1), (workers, spec.scaling.num_workers), (controller, _CONTROLLER_HELPERS)]


def prewarm(spec: JobSpec) -> None:
    """Have a local Ray start the processes ``fit()`` will ask for, now: Ray Train gives its controller and
    workers a runtime env, so none of them can take the idle workers Ray pre-starts for the driver, and each
    waited for a fresh interpreter, one after another. Asked for before the data is planned (or, from the
    runner, while it is prepared), they start in the background and are idle by the time they are needed,
    the training workers with their imports done (``tests/train/test_startup_parts.py`` checks that the
    run's processes are these)."""
    prestart_when_up(run_envs(spec))


def run_training(spec: JobSpec, prepared: PreparedData, logger: MetricLogger | None = None, *,
                 progress_file: Path | None = None, run_name: str | None = None,
                 callbacks: list | None = None) -> RunResult:
    """Fit ``spec`` on ``prepared`` and return the model, its history and test figures.

    Per-epoch and test metrics go to ``logger`` (anything picklable with ``log_metrics(metrics, step)``:
    it is called on the Ray Train controller), the latest epoch to ``progress_file``. A ``run_name`` seen
    before (under ``scaling.storage_path``) resumes from that run's latest checkpoint; without one the run
    is always fresh. ``callbacks`` are further Ray Train ``UserCallback``s (a Tune trial's report bridge).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchard.train.feed import ShardConfig, read_split
    from orchard.train.worker import TEST_FILE, train_loop

    stamps = {"start": time.time()}
    # A start begun in the background (runner: ``start_ray_early``) is waited for here: ray_start is then
    # the wait, ray_start_background the whole start.
    _, background = settle_early_start()
    start_ray(training_cpus(spec.scaling.num_workers, spec.scaling.cpus_per_worker))
    if not background:  # a background start asked for them as soon as Ray was up (runner)
        prewarm(spec)
    stamps["ray_started"] = time.time()
    _autoscaling_coordinator_now()
    _quiet_ray_data()
    _warn_node_local_storage(spec.scaling.storage_path)
    datasets = {s: read_split(str(prepared.split_path(s).resolve()), prepared.manifest["counts"][s],
                              prepared.manifest["feature_dim"], shuffle_files=s == "train", seed=spec.train.seed)
                for s in ("train", "val", "test")}
    stamps["data_planned"] = time.time()
    use_gpu = _use_gpu(spec)
    cut = prepared.manifest["counts"]["train"] % spec.scaling.num_workers
    # Ray's streaming_split(equal=True) drops the remainder; workers report train/rows_dropped_per_epoch.
    if cut:
        log.warning("train: %d training row(s) are left out of each epoch so %d workers get equal shards",
                    cut, spec.scaling.num_workers)
    progress_file = Path(progress_file).resolve() if progress_file else None  # the controller runs elsewhere
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.model_dump(mode="json"), "manifest": _worker_manifest(spec, prepared)},
        # The process group's timeout bounds every gloo/NCCL collective: a rank stuck in an all-reduce with
        # a stopped peer raises after it (torch's default here would be Ray's 1800 s).
        torch_config=TorchConfig(timeout_s=spec.scaling.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": spec.scaling.cpus_per_worker}),
        datasets=datasets,
        # train in equal shards (DDP step counts); val/test in disjoint whole blocks: every row evaluated once.
        dataset_config=ShardConfig(equal=["train"], disjoint=["val", "test"]),
        run_config=RunConfig(
            # Without a run_name every call is a fresh run: reusing a name resumes that run's checkpoints.
            name=run_name or f"{spec.name}-{spec.digest()}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=str(Path(spec.scaling.storage_path).resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.scaling.keep_checkpoints),
            failure_config=FailureConfig(max_failures=spec.scaling.max_failures),
            worker_runtime_env={"env_vars": WORKER_ENV_VARS},
            callbacks=[_progress_callback(logger, progress_file), _restart_counter(logger), *(callbacks or [])],
        ),
    )
    log.info("fitting %s with %d worker(s), gpu=%s", spec.name, spec.scaling.num_workers, use_gpu)
    stamps["fit"] = time.time()
    with _train_env(spec.scaling.collective_timeout_s):
        result = trainer.fit()
    stamps["fit_returned"] = time.time()
    out = _collect(spec, prepared, result.checkpoint, TEST_FILE)
    out.extra["startup"] = startup_parts(stamps, out.history, progress_file)
    if background:
        out.extra["startup"]["ray_start_background"] = background
    return out


def _autoscaling_coordinator_now() -> None:
    """Create the actor Ray Train's controller asks for resources before it starts any worker.

    The controller gets or creates Ray's detached ``AutoscalingCoordinator`` in its first step and
    waits for the answer. Created there, the actor inherits the controller's runtime env (Ray Train's
    env vars), so the raylet starts a fresh Python process for it while the run waits (~1.3 s between
    the coordinator's process start and the next actor's, measured in one digits run's Ray logs).
    Created from here, with this job's plain env, it takes one of the idle workers Ray pre-started for
    the driver, while the controller's own process starts; the controller then gets the same actor.
    Not on a cluster joined through $RAY_ADDRESS: a job there runs in its own runtime env (working_dir),
    so an actor of the driver takes no pre-started worker either.
    """
    if os.environ.get("RAY_ADDRESS"):
        return
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception:  # noqa: BLE001 - an optimisation: the controller creates it as before
        log.debug("could not create Ray's autoscaling coordinator early", exc_info=True)


def startup_parts(stamps: dict[str, float], history: list[dict[str, Any]], progress_file: Path | None
                  ) -> dict[str, float]:
    """Seconds of a run's fixed cost, by part, from wall-clock stamps (what ``orchard bench train`` reports).

    worker_group: fit() to the first epoch's report, less that epoch's training (worker group and process
    group start, model build, the first val pass and checkpoint); first_epoch_extra: epoch 1's training
    time over a later epoch's (Ray Data's first execution, the epoch cache filling); teardown: the last
    report to fit() returning (worker group shutdown). The last three need the progress file's stamps.
    """
    parts = {"ray_start": stamps["ray_started"] - stamps["start"],
             "data_plan": stamps["data_planned"] - stamps["ray_started"]}
    seconds = [h["train/epoch_seconds"] for h in history if "train/epoch_seconds" in h]
    if len(seconds) > 1:
        parts["first_epoch_extra"] = max(0.0, seconds[0] - float(np.median(seconds[1:])))
    state = read_progress(progress_file) if progress_file is not None else None
    if state and "first_report_at" in state and seconds:
        parts["worker_group"] = state["first_report_at"] - stamps["fit"] - seconds[0]
        parts["teardown"] = stamps["fit_returned"] - state["report_at"]
    return parts


def _worker_manifest(spec: JobSpec, prepared: PreparedData) -> dict[str, Any]:
    """The manifest plus what workers need that it may lack (class counts for balanced weights)."""
    manifest = dict(prepared.manifest)
    if spec.train.class_weights == "balanced" and "class_counts" not in manifest:
        counts = np.bincount(read_labels(prepared, "train"), minlength=manifest["num_classes"])
        manifest["class_counts"] = counts.tolist()
    return manifest


def _collect(spec: JobSpec, prepared: PreparedData, checkpoint, test_file: str) -> RunResult:
    from safetensors.torch import load_file

    from orchard.train.worker import BEST_FILE

    model = build_model(spec, prepared.manifest)
    with checkpoint.as_directory() as d:
        state = load_checkpoint(d, model)
        if Path(d, BEST_FILE).is_file():
            model.load_state_dict(load_file(str(Path(d, BEST_FILE))))
        test = json.loads(Path(d, test_file).read_text())
    confusion = np.asarray(test["confusion"]) if test["confusion"] is not None else None
    return RunResult(model=model.eval(), history=state["history"], x="epoch", test=test["metrics"],
                     confusion=confusion,
                     extra={"best_epoch": test.get("best_epoch"), "checkpoint_path": checkpoint.path})
