"""The run lifecycle: one MLflow run per job, created on the driver and finished exactly once.

Engines never see a ``JobRun``: they get its picklable ``logger`` and return their results, which the
driver logs here (see ``outputs.py``).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import subprocess
import time
from pathlib import Path
from typing import Any

from orchard.config import JobSpec, spec_yaml
from orchard.tracking import dashboard
from orchard.tracking.buffer import (
    TrackingUnavailable,
    announce_outage,
    drain,
    is_outage,
    reachable,
    send_terminated,
    sync_command,
)
from orchard.tracking.logger import RunLogger, default_buffer_dir
from orchard.tracking.watch import OutageWatch, buffered_system_monitor

_log = logging.getLogger("orchard.tracking")


def resolve_uri(spec: JobSpec | None = None) -> str:
    """Spec, then $MLFLOW_TRACKING_URI, then MLflow's own default (an SQLite file in the working folder)."""
    if spec is not None and spec.tracking.uri:
        return spec.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    # MLflow's default, made absolute so processes started elsewhere (Ray actors) write the same store.
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_reachable(uri: str) -> None:
    """Raise ``TrackingUnavailable`` at once if the tracking server at ``uri`` does not answer.

    Call before any compute: the run cannot be created without the server.
    """
    if not reachable(uri):
        raise TrackingUnavailable(f"MLflow tracking server at {uri} is unreachable: start it, or point "
                                  "tracking.uri / $MLFLOW_TRACKING_URI at one that runs")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class JobRun:
    """An MLflow run for one job: created on the driver, finished exactly once."""

    def __init__(self, spec: JobSpec, run_name: str | None = None, resume_run_id: str | None = None,
                 buffer_dir: str | Path | None = None) -> None:
        import mlflow

        self.spec = spec
        self.uri = resolve_uri(spec)
        check_reachable(self.uri)  # the run must be created: fail now, not after MLflow's minutes of retries
        mlflow.set_tracking_uri(self.uri)
        client = mlflow.tracking.MlflowClient(self.uri)
        self._client = client
        self._finished = False
        self._monitor = None
        self._energy = None  # an orchard.tracking.energy.EnergyMeter, once attach_energy() is called
        self._energy_step = 0
        self._watch: OutageWatch | None = None
        self._settled = False  # the end-of-run wait for the server happened
        self._gave_up = False  # ...and the grace ran out: finish() does not wait a second time
        self._buffer_dir = str(Path(buffer_dir).resolve()) if buffer_dir else str(default_buffer_dir())
        self.resumed = resume_run_id is not None
        if resume_run_id:
            run = client.get_run(resume_run_id)
            client.update_run(resume_run_id, status="RUNNING")
            self.run_id, self.experiment_id = resume_run_id, run.info.experiment_id
            self._open_logger()
            return
        experiment = spec.tracking.experiment or spec.name
        exp, exp_id = _experiment(experiment)
        for k, v in dashboard.experiment_tags().items():  # an experiment made before Orchard set its kind
            if exp is not None and k not in exp.tags:
                client.set_experiment_tag(exp_id, k, v)
        run = client.create_run(
            exp_id,
            run_name=run_name,
            tags={"orchard.kind": spec.kind, "orchard.spec_hash": spec.digest(), "orchard.git_commit": _git_commit(),
                  "orchard.job": spec.name, **dashboard.run_tags(spec)},
        )
        self.run_id = run.info.run_id
        self.experiment_id = exp_id
        self._open_logger()
        self._log_spec()

    def _open_logger(self) -> None:
        self.logger = RunLogger(self.uri, self.run_id, self._buffer_dir)
        # Warns here, on the driver, when the controller process starts buffering: its own log is not shown.
        self._watch = OutageWatch(self.logger)
        self._watch.start()

    @staticmethod
    def interrupted_run(spec: JobSpec) -> str | None:
        """The run ``orchard run --resume`` continues: see ``resume_target``."""
        return JobRun.resume_target(spec)[0]

    @staticmethod
    def resume_target(spec: JobSpec) -> tuple[str | None, str]:
        """(run id, "") of the newest run of this exact spec (same spec hash) if it did not finish, else
        (None, why not). A finished run is never resumed, even when an older run of the spec failed: that
        one was superseded. An unfinished run of the same name but another spec is not resumed either."""
        import mlflow

        client = mlflow.tracking.MlflowClient(resolve_uri(spec))
        exp = client.get_experiment_by_name(spec.tracking.experiment or spec.name)
        runs = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`orchard.job` = '{spec.name}'",
            order_by=["attributes.start_time DESC"], max_results=50) if exp is not None else []
        digest = spec.digest()
        same = [r for r in runs if r.data.tags.get("orchard.spec_hash") == digest]
        if same and same[0].info.status != "FINISHED":
            return same[0].info.run_id, ""
        if same:
            return None, (f"the latest run of '{spec.name}' with this spec ({same[0].info.run_id}) finished: "
                          "nothing to resume; run without --resume to train again as a new run")
        other = next((r for r in runs if r.info.status != "FINISHED"), None)
        if other is not None:
            return None, (f"the unfinished run {other.info.run_id} of '{spec.name}' was started from another "
                          f"spec (spec hash {other.data.tags.get('orchard.spec_hash')}, this one {digest}): "
                          "resume it with its own spec (its spec/resolved.yaml artifact), or run without "
                          "--resume to start a new run")
        return None, (f"no unfinished run of '{spec.name}' with this exact spec (spec hash {digest}) "
                      "in the tracking store")

    # -- lifecycle -------------------------------------------------------------------------------
    def monitor_system(self, interval_s: float = 5.0) -> None:
        """CPU, memory, disk, network (and GPU where pynvml sees one) as ``system/*`` metrics while the job runs."""
        self._monitor = buffered_system_monitor(self.logger, interval_s, self.resumed)
        self._monitor.start()

    def attach_energy(self, meter) -> None:
        """Log ``energy/kwh`` and ``energy/co2_kg`` from ``meter`` (see orchard.tracking.energy) at the end
        of the run, and at each :meth:`log_energy` step before (a federation's rounds)."""
        self._energy = meter
        # A resumed run continues the totals its interrupted process logged last.
        last = self._client.get_run(self.run_id).data.metrics if self.resumed else {}
        self._energy_offset = (last.get("energy/kwh", 0.0), last.get("energy/co2_kg", 0.0))
        self.set_tags({"orchard.energy_country": meter.country})

    def _energy_metrics(self, reading: tuple[float, float]) -> dict[str, float]:
        return {"energy/kwh": self._energy_offset[0] + reading[0], "energy/co2_kg": self._energy_offset[1] + reading[1]}

    def log_energy(self, step: int) -> None:
        """The meter's totals so far as ``energy/*`` at ``step``."""
        reading = self._energy.read() if self._energy is not None else None
        if reading is not None:
            self.logger.log_metrics(self._energy_metrics(reading), step)
            self._energy_step = step

    def _close_energy(self) -> None:
        meter, self._energy = self._energy, None
        try:
            reading = meter.stop()
            if reading is not None:
                self.logger.log_metrics(self._energy_metrics(reading), self._energy_step)
            self.set_tags({"orchard.energy_source": meter.source})
        except Exception as exc:  # noqa: BLE001 - the run's own status matters more than its energy figure
            _log.warning("energy figures not logged: %s", exc)

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run exactly once; buffered metrics are replayed first (waiting up to the grace period).

        If the server is still down, the buffer (with the closing status) stays on disk and the log says
        how to sync it: the job's own result does not depend on the tracking server being back.
        """
        if self._energy is not None and not self._finished:
            self._close_energy()
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if self._finished:
            return
        self._finished = True
        if self._watch is not None:
            self._watch.stop()
        buf = self.logger.buffer
        grace = 0.0 if self._gave_up else self.spec.tracking.outage_grace_s
        deadline = time.monotonic() + grace
        drained = drain(buf, self.uri, grace)
        if drained:
            try:
                send_terminated(self.uri, self.run_id, status, int(time.time() * 1000))
                buf.remove()
                return
            except Exception as exc:  # noqa: BLE001 - only an outage is kept for later
                if not is_outage(exc):
                    raise
        with buf.locked():
            buf.append({"uri": self.uri, "run_id": self.run_id, "terminate": status,
                        "end_time": int(time.time() * 1000)})
        # The server (or its database, restarting) failed only the closing call: retry it through the
        # buffer for what is left of the grace rather than leave the run RUNNING.
        if drained and drain(buf, self.uri, max(0.0, deadline - time.monotonic())):
            buf.remove()
            return
        announce_outage(buf, self.uri)
        _log.warning("tracking server still unreachable after %.0f s: run %s is not closed and %d metrics "
                     "are kept in %s; sync them later with: %s", grace, self.run_id, buf.metric_count(),
                     buf.path, sync_command(buf.folder))

    def _settle(self) -> None:
        """Before end-of-run logging (plots, model) that needs the server: wait for it and replay the buffer."""
        if self._settled:
            return
        self._settled = True
        buf, grace = self.logger.buffer, self.spec.tracking.outage_grace_s
        deadline = time.monotonic() + grace
        while not reachable(self.uri) and time.monotonic() < deadline:
            time.sleep(2.0)
        if not drain(buf, self.uri, max(0.0, deadline - time.monotonic())):
            self._gave_up = True
            raise TrackingUnavailable(
                f"MLflow tracking server at {self.uri} unreachable for {grace:.0f} s (tracking.outage_grace_s) "
                f"at the end of run {self.run_id}: the model was not logged; {buf.metric_count()} metrics are "
                f"kept in {buf.path} (sync later with: {sync_command(buf.folder)})")

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

    def describe(self, manifest: dict, headline: tuple[str, float] | None, model_params: int | None) -> None:
        """The run page's Description: what job, data and model, and the headline test result."""
        self._settle()
        text = dashboard.run_description(self.spec, manifest, headline, model_params)
        self._client.set_tag(self.run_id, dashboard.NOTE_TAG, text)

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
        self._settle()
        self._client.log_figure(self.run_id, fig, path)

    def log_text(self, text: str, path: str) -> None:
        self._settle()
        self._client.log_text(self.run_id, text, path)

    def log_table(self, columns: list[str], rows: list[list[Any]], path: str) -> bool:
        """A table in MLflow's table format (UI artifact view, ``mlflow.load_table``), logged once per run.

        MLflow's ``log_table`` appends to an existing file of the same name, so a resumed run logging it
        again would double the rows: the first table stays. Returns False if it was already there.
        """
        self._settle()
        folder = posixpath.dirname(path) or None
        if any(f.path == path for f in self._client.list_artifacts(self.run_id, folder)):
            return False
        data = {c: [row[i] for row in rows] for i, c in enumerate(columns)}
        self._client.log_table(self.run_id, data=data, artifact_file=path)
        return True

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._settle()
        self._client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_model(self, model, example) -> str:
        """Log the model with a tensor signature so pyfunc can load and serve it. Returns the model URI."""
        self._settle()
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


def _experiment(name: str):
    """(experiment or None if this call created it, its id): get or create, safe when jobs start at once.

    Several jobs of one spec starting together all find no experiment and all try to create it; the
    store refuses all but one (RESOURCE_ALREADY_EXISTS), and the others then use that one.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp, exp.experiment_id
    try:
        return None, mlflow.create_experiment(name, tags=dashboard.experiment_tags())
    except MlflowException as e:
        exp = mlflow.get_experiment_by_name(name)
        if exp is None or "ALREADY_EXISTS" not in str(e.error_code) + str(e):
            raise
        return exp, exp.experiment_id
