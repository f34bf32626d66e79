"""Driver side of a Ray Train job: start Ray, stream the prepared Parquet, fit, collect the result.

Metrics reach MLflow through a ``UserCallback`` that runs on the Ray Train controller, into the run the
driver created: workers never open MLflow runs, so a restarted worker group cannot duplicate one.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from orchard.config import JobSpec
from orchard.data.manifest import PreparedData, read_labels
from orchard.engine.checkpoint import load_checkpoint
from orchard.models import build_model
from orchard.tracking import RunLogger

log = logging.getLogger("orchard.train")


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]]
    test_metrics: dict[str, float]
    confusion: np.ndarray
    checkpoint_path: str
    extra: dict[str, Any] = field(default_factory=dict)


def init_ray(min_cpus: float = 0) -> None:
    """Join $RAY_ADDRESS if set, else start a quiet local instance (idempotent).

    A local instance gets at least ``min_cpus`` logical CPUs: the train workers reserve theirs for the
    whole run, and Ray Data's read tasks need one more, else the job waits forever on a small machine.
    """
    import os

    import ray

    if ray.is_initialized():
        return
    from ray.data import DataContext

    kwargs: dict[str, Any] = {}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs["num_cpus"] = max(os.cpu_count() or 1, math.ceil(min_cpus))
    cwd = os.getcwd()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=True,
             logging_level=logging.WARNING, **kwargs)
    # Inside a Ray job whose project was shipped as working_dir, joining the cluster re-extracts that
    # folder: the old directory (our cwd) is gone and relative paths fail until we enter the new one.
    os.chdir(cwd)
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


def _progress_callback(logger: RunLogger | None, progress_file: Path | None):
    from ray.train import UserCallback

    class MlflowProgress(UserCallback):
        """Runs on the controller after every report: rank 0's metrics go to the driver's MLflow run."""

        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            step = int(m.pop("epoch", 0))
            if logger is not None:
                logger.log_metrics({k: v for k, v in m.items() if isinstance(v, int | float)}, step)
            if progress_file is not None:
                progress_file.write_text(json.dumps({"epoch": step, **m}))

    return MlflowProgress()


def run_training(spec: JobSpec, prepared: PreparedData, logger: RunLogger | None = None,
                 run_dir: Path | None = None, run_name: str | None = None) -> TrainResult:
    """Fit ``spec`` on ``prepared``. A ``run_name`` seen before resumes from that run's latest checkpoint."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchard.train.feed import ingest_options, read_split
    from orchard.train.worker import TEST_FILE, train_loop

    init_ray(spec.scaling.num_workers * spec.scaling.cpus_per_worker + 1)
    _warn_node_local_storage(spec.scaling.storage_path)
    datasets = {s: read_split(str(prepared.split_path(s).resolve()), prepared.manifest["counts"][s],
                              prepared.manifest["feature_dim"], shuffle_files=s == "train", seed=spec.train.seed)
                for s in ("train", "val", "test")}
    use_gpu = _use_gpu(spec)
    cut = prepared.manifest["counts"]["train"] % spec.scaling.num_workers
    # Ray's streaming_split(equal=True) drops the remainder; workers report train/rows_dropped_per_epoch.
    if cut:
        log.warning("train: %d training row(s) are left out of each epoch so %d workers get equal shards",
                    cut, spec.scaling.num_workers)
    progress_file = (run_dir / "progress.json").resolve() if run_dir else None
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.model_dump(mode="json"), "manifest": _worker_manifest(spec, prepared)},
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": spec.scaling.cpus_per_worker}),
        datasets=datasets,
        # val/test are read whole by every rank, which evaluates every world-th batch: exact counts, no dropped rows.
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest_options()),
        run_config=RunConfig(
            name=run_name or f"{spec.name}-{logger.run_id if logger else spec.digest()}",
            storage_path=str(Path(spec.scaling.storage_path).resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.scaling.keep_checkpoints),
            failure_config=FailureConfig(max_failures=spec.scaling.max_failures),
            callbacks=[_progress_callback(logger, progress_file)],
        ),
    )
    log.info("fitting %s with %d worker(s), gpu=%s", spec.name, spec.scaling.num_workers, use_gpu)
    result = trainer.fit()
    return _collect(spec, prepared, result.checkpoint, TEST_FILE)


def _worker_manifest(spec: JobSpec, prepared: PreparedData) -> dict[str, Any]:
    """The manifest plus what workers need that it may lack (class counts for balanced weights)."""
    manifest = dict(prepared.manifest)
    if spec.train.class_weights == "balanced" and "class_counts" not in manifest:
        counts = np.bincount(read_labels(prepared, "train"), minlength=manifest["num_classes"])
        manifest["class_counts"] = counts.tolist()
    return manifest


def _collect(spec: JobSpec, prepared: PreparedData, checkpoint, test_file: str) -> TrainResult:
    from safetensors.torch import load_file

    from orchard.train.worker import BEST_FILE

    model = build_model(spec, prepared.manifest)
    with checkpoint.as_directory() as d:
        state = load_checkpoint(d, model)
        if Path(d, BEST_FILE).is_file():
            model.load_state_dict(load_file(str(Path(d, BEST_FILE))))
        test = json.loads(Path(d, test_file).read_text())
    confusion = np.asarray(test["confusion"]) if test["confusion"] is not None else None
    return TrainResult(model=model.eval(), history=state["history"], test_metrics=test["metrics"],
                       confusion=confusion, checkpoint_path=checkpoint.path,
                       extra={"best_epoch": test.get("best_epoch")})
