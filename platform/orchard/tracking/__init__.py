"""The one place that imports mlflow: run lifecycle, metrics, plots, datasets and models.

The run is created on the driver. Anything that logs from another process (the Ray Train controller's
callback) gets a small picklable ``RunLogger`` holding only the tracking URI and run id, so a restarted
worker group can never open a second run.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchard.config import JobSpec, spec_yaml


def resolve_uri(spec: JobSpec | None = None) -> str:
    """Spec, then $MLFLOW_TRACKING_URI, then MLflow's own default (an SQLite file in the working folder)."""
    if spec is not None and spec.tracking.uri:
        return spec.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    # MLflow's default, made absolute so processes started elsewhere (Ray actors) write the same store.
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class RunLogger:
    """Picklable handle for logging metrics into an existing run from any process."""

    tracking_uri: str
    run_id: str

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        # One call per epoch/round: sync log_metric costs ~2 ms each on SQLite.
        if batch:
            self.client().log_batch(self.run_id, metrics=batch)


class JobRun:
    """An MLflow run for one job: created on the driver, finished exactly once."""

    def __init__(self, spec: JobSpec, run_name: str | None = None, resume_run_id: str | None = None) -> None:
        import mlflow

        self.spec = spec
        self.uri = resolve_uri(spec)
        mlflow.set_tracking_uri(self.uri)
        client = mlflow.tracking.MlflowClient(self.uri)
        self._client = client
        self._finished = False
        self._monitor = None
        self.resumed = resume_run_id is not None
        if resume_run_id:
            run = client.get_run(resume_run_id)
            client.update_run(resume_run_id, status="RUNNING")
            self.run_id, self.experiment_id = resume_run_id, run.info.experiment_id
            self.logger = RunLogger(self.uri, self.run_id)
            return
        experiment = spec.tracking.experiment or spec.name
        exp = mlflow.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else mlflow.create_experiment(experiment)
        run = client.create_run(
            exp_id,
            run_name=run_name,
            tags={"orchard.kind": spec.kind, "orchard.spec_hash": spec.digest(), "orchard.git_commit": _git_commit(),
                  "orchard.job": spec.name},
        )
        self.run_id = run.info.run_id
        self.experiment_id = exp_id
        self.logger = RunLogger(self.uri, self.run_id)
        self._log_spec()

    @staticmethod
    def interrupted_run(spec: JobSpec) -> str | None:
        """The newest unfinished run of this exact spec (same spec hash), for ``orchard run --resume``."""
        import mlflow

        client = mlflow.tracking.MlflowClient(resolve_uri(spec))
        exp = client.get_experiment_by_name(spec.tracking.experiment or spec.name)
        if exp is None:
            return None
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`orchard.spec_hash` = '{spec.digest()}' and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    # -- lifecycle -------------------------------------------------------------------------------
    def monitor_system(self, interval_s: float = 5.0) -> None:
        """CPU, memory, disk, network (and GPU where pynvml sees one) as ``system/*`` metrics while the job runs."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, resume_logging=self.resumed,
                                             tracking_uri=self.uri)
        self._monitor.start()

    def finish(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if not self._finished:
            self._client.set_terminated(self.run_id, status=status)
            self._finished = True

    def __enter__(self) -> JobRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")

    # -- logging ---------------------------------------------------------------------------------
    def _log_spec(self) -> None:
        from mlflow.entities import Param

        params = [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in self.spec.flat().items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self._client.log_batch(self.run_id, params=params[i : i + 100])
        self._client.log_text(self.run_id, spec_yaml(self.spec), "spec/resolved.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.logger.log_metrics(metrics, step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def log_dataset(self, prepared) -> None:
        """The manifest as an artifact, and each split as a dataset input keyed by the content hash."""
        from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        m = prepared.manifest
        self._client.log_dict(self.run_id, m, "data/manifest.json")
        inputs = []
        for split, context in (("train", "training"), ("val", "validation"), ("test", "testing")):
            uri = prepared.split_path(split).resolve().as_uri()
            # Several sources claim local paths; the artifact-store one keeps the UI's link usable.
            candidates = [s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource"]
            source = resolve_dataset_source(uri, candidate_sources=candidates[:1] or None)
            ds = MetaDataset(source=source, name=f"{m['dataset']}-{split}", digest=m["content_hash"][:36])
            inputs.append(DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", context)]))
        self._client.log_inputs(self.run_id, datasets=inputs)
        counts = m["counts"]
        self.log_metrics({f"data/{k}_rows": v for k, v in counts.items()}, step=0)

    def log_figure(self, fig, path: str) -> None:
        self._client.log_figure(self.run_id, fig, path)

    def log_text(self, text: str, path: str) -> None:
        self._client.log_text(self.run_id, text, path)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_model(self, model, example) -> str:
        """Log the model with a tensor signature so pyfunc can load and serve it. Returns the model URI."""
        import mlflow
        import numpy as np
        from mlflow.models import infer_signature

        model = model.cpu().eval()
        import torch

        with torch.no_grad():
            out = model(torch.from_numpy(np.array(example, dtype=np.float32))).numpy()
        signature = infer_signature(np.asarray(example), out)
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                signature=signature,
                input_example=np.asarray(example),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )
        return info.model_uri

