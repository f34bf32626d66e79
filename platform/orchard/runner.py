"""One job from spec to tracked model, as a list of named steps.

prepare data → open the MLflow run → train (Ray) or federate (Flower) → log results → close the run.
The spec was validated before this point; nothing here runs for a spec that failed validation.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from orchard.config import JobSpec
from orchard.console import engine_output_to
from orchard.progress import progress_file, read_progress

if TYPE_CHECKING:
    from orchard.results import RunResult


@dataclass
class JobSummary:
    name: str
    kind: str
    engine: str
    headline: tuple[str, float]  # the test metric people look at first (accuracy, or R² for regression)
    test_f1: float | None
    wall_s: float
    run_id: str
    tracking_uri: str
    quarantined: int
    log_path: Path
    model_uri: str | None = None


def run_dir_for(spec: JobSpec) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(".orchard/runs") / f"{spec.name}-{stamp}"


def run_job(spec: JobSpec, console: Console | None = None, resume: bool = False) -> JobSummary:
    """Run ``spec``; with ``resume``, continue its newest unfinished run from the last checkpoint."""
    console = console or Console()
    if spec.kind == "tune":
        from orchard.tune import run_tune

        return run_tune(spec, console, resume=resume)
    _check_engine_settings(spec)
    _join_cluster(spec)  # first: joining may re-extract the shipped folder, so nothing is written before
    run_dir = run_dir_for(spec)
    log_path = run_dir / "engine.log"
    # One block from here on: a fresh SQLite store logs its table creation, and Ray's processes, started in
    # the background below, inherit the log file as their stdout/stderr, never the terminal.
    with engine_output_to(log_path, console) as term:
        meter = _energy_meter(spec)  # measures from here: Ray's start and Spark prep are part of the run
        _start_ray_early(spec)
        _check_tracking(spec)
        resume_id = _resumable(spec) if resume else None
        t0 = time.perf_counter()
        with _progress(term) as progress:
            prepared = _step(progress, "prepare data (Spark)", lambda: _prepare(spec, log_path))
            timings = {"prepare": time.perf_counter() - t0}
            summary = _tracked(spec, prepared, progress, run_dir, resume_id, timings, meter)
    summary.wall_s = time.perf_counter() - t0
    _write_timings(run_dir, timings | {"run_job": summary.wall_s})
    summary.log_path = log_path
    return summary


TIMINGS_FILE = "timings.json"


def _write_timings(run_dir: Path, timings: dict[str, float]) -> None:
    """Seconds per fixed-cost part of this run (prepare, mlflow_run, ray_start...), for ``orchard bench train``."""
    import json

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / TIMINGS_FILE).write_text(json.dumps({k: round(v, 3) for k, v in timings.items()}, indent=1))


def prepare_only(spec: JobSpec, console: Console | None = None):
    console = console or Console()
    log_path = run_dir_for(spec) / "engine.log"
    with engine_output_to(log_path, console) as term, _progress(term) as progress:
        return _step(progress, "prepare data (Spark)", lambda: _prepare(spec, log_path))


def _energy_meter(spec: JobSpec):
    """A started EnergyMeter, or None with ``tracking.energy: false``; an unknown country is a spec error."""
    if not spec.tracking.energy:
        return None
    from orchard.config import SpecError
    from orchard.tracking.energy import EnergyMeter

    try:
        return EnergyMeter(spec.tracking.energy_country).start()
    except ValueError as exc:
        raise SpecError(f"tracking.energy_country: {exc}") from None


def _check_engine_settings(spec: JobSpec) -> None:
    """Checks that need the engine's rules (not just the schema), still before any data or run exists."""
    if spec.kind == "federated":
        from orchard.federated.strategies import check_strategy

        check_strategy(spec)


def _join_cluster(spec: JobSpec) -> None:
    """Inside a Ray job, join the cluster before writing anything: joining may re-extract the shipped folder."""
    import os

    if spec.kind == "train" and os.environ.get("RAY_ADDRESS"):
        from orchard.raystart import start_ray

        start_ray()


def _start_ray_early(spec: JobSpec) -> None:
    """A training run's local Ray starts now, in the background: its seconds (GCS, raylet, agents,
    pre-started workers) overlap opening the tracking store and preparing the data, and Ray Train waits
    only for what is left (``train/launcher.py``). Federated runs start Ray inside the simulation, which
    sizes its client pool from what Ray has free at that moment; a cluster is joined by ``_join_cluster``."""
    if spec.kind == "train":
        from orchard.raystart import start_ray_early, training_cpus

        if start_ray_early(training_cpus(spec.scaling.num_workers, spec.scaling.cpus_per_worker)):
            # Imported after the start began (torch, Ray Train: they overlap it; run_training needs them
            # anyway): once Ray is up, the processes Ray Train will ask for start.
            from orchard.train.launcher import prewarm

            prewarm(spec)


def _check_tracking(spec: JobSpec) -> None:
    """An unreachable tracking server fails the job here, in seconds, before Spark starts or anything trains
    (a background Ray start is then shut down as the command exits)."""
    from orchard.tracking import check_reachable, resolve_uri

    check_reachable(resolve_uri(spec))


def _prepare(spec: JobSpec, log_path: Path):
    from orchard.data import prepare

    return prepare(spec, log_path=log_path)


def _resumable(spec: JobSpec) -> str:
    from orchard.config import SpecError
    from orchard.tracking import JobRun

    run_id, why_not = JobRun.resume_target(spec)
    if run_id is None:
        raise SpecError(f"--resume: {why_not}")
    return run_id


def _tracked(spec: JobSpec, prepared, progress: Progress, run_dir: Path, resume_id: str | None,
             timings: dict[str, float], meter=None) -> JobSummary:
    from orchard.tracking import JobRun

    t0 = time.perf_counter()
    job = JobRun(spec, resume_run_id=resume_id)
    try:
        job.monitor_system()
        if meter is not None:
            job.attach_energy(meter)
        if not job.resumed:
            job.log_dataset(prepared)
        timings["mlflow_run"] = time.perf_counter() - t0
        if spec.kind == "train":
            result = _train(spec, prepared, job, progress, run_dir)
            engine = f"Ray Train ({spec.scaling.num_workers} workers)"
        else:
            result = _federate(spec, prepared, job, progress, run_dir)
            engine = f"Flower ({spec.federated.clients} clients)"
        timings.update(result.extra.get("startup", {}))
        t0 = time.perf_counter()
        model_uri = _step(progress, "log model and plots (MLflow)", lambda: _log_outputs(job, spec, prepared, result))
        timings["log_outputs"] = time.perf_counter() - t0
        headline = result.headline()
        job.describe(prepared.manifest, headline, sum(p.numel() for p in result.model.parameters()))
        job.log_artifact(run_dir / "engine.log", "logs")
    except BaseException:
        job.finish("FAILED")
        raise
    job.finish("FINISHED")
    if spec.tracking.register and model_uri:  # only a finished run's model enters the registry
        model_uri = _step(progress, "register model (MLflow)", lambda: _register(job, spec, model_uri, result))
    return JobSummary(name=spec.name, kind=spec.kind, engine=engine, headline=headline,
                      test_f1=result.test.get("test/f1"), wall_s=0.0,
                      run_id=job.run_id, tracking_uri=job.uri, quarantined=prepared.quarantined,
                      log_path=run_dir, model_uri=model_uri)


def _train(spec: JobSpec, prepared, job, progress: Progress, run_dir: Path) -> RunResult:
    from orchard.train import run_training

    path = progress_file(run_dir)
    with ProgressFileBar(progress, path, "train (Ray Train)", spec.train.epochs, "epoch"):
        # The Ray Train run is named after the MLflow run, so --resume finds its checkpoints again.
        return run_training(spec, prepared, job.logger, progress_file=path, run_name=f"{spec.name}-{job.run_id}")


def _federate(spec: JobSpec, prepared, job, progress: Progress, run_dir: Path) -> RunResult:
    from orchard.federated import run_federated
    from orchard.federated.simulation import CHECKPOINT_ROOT

    path = progress_file(run_dir)
    with ProgressFileBar(progress, path, "federate (Flower)", spec.federated.rounds, "round"):
        # Round checkpoints are keyed by the MLflow run, so --resume continues after the last round.
        return run_federated(spec, prepared, job.logger, checkpoint_dir=CHECKPOINT_ROOT / job.run_id,
                             progress_file=path, log_path=run_dir / "engine.log",
                             on_round=lambda row: job.log_energy(row["round"]))  # energy/* per round


def _log_outputs(job, spec: JobSpec, prepared, result: RunResult) -> str | None:
    from orchard.tracking.outputs import log_result

    log_result(job, result, spec.name, prepared.manifest.get("classes"))
    model_uri = job.log_model(result.model, _input_example(prepared)) if spec.tracking.log_model else None
    if spec.explain is not None:
        from orchard.explain import explain_job

        explain_job(job, spec, prepared, result.model)
    return model_uri


def _register(job, spec: JobSpec, model_uri: str, result: RunResult) -> str:
    from orchard.deploy.registry import register

    version = register(job.uri, model_uri, spec.tracking.register, result.test)
    return f"models:/{spec.tracking.register}/{version}"


def _input_example(prepared, rows: int = 4):
    from orchard.data.manifest import read_head

    return read_head(prepared, "test", rows)


# -- progress -------------------------------------------------------------------------------------------

def _progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), console=console, transient=False)


def _step(progress: Progress, name: str, fn):
    task = progress.add_task(name, total=1, info="")
    out = fn()
    progress.update(task, completed=1)
    return out


class ProgressFileBar:
    """A progress bar that follows an engine's progress file (written by its callback in another process)."""

    def __init__(self, progress: Progress, path: Path, name: str, total: int, unit: str) -> None:
        self.progress, self.path, self.unit = progress, path, unit
        self.task = progress.add_task(name, total=total, info="starting")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._read()
        if exc[0] is None:
            self.progress.update(self.task, completed=self.progress.tasks[self.task].total)

    def _poll(self) -> None:
        while not self.stop.wait(0.5):
            self._read()

    def _read(self) -> None:
        state = read_progress(self.path)
        if state is None:
            return
        shown = {k: v for k, v in state.items() if k.endswith("accuracy") or k.endswith("loss")}
        info = "  ".join(f"{k}={v:.3f}" for k, v in list(shown.items())[:4] if isinstance(v, float))
        self.progress.update(self.task, completed=int(state.get(self.unit, 0)), info=info)
