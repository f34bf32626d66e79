"""A search as a list of named steps: check → prepare data once → parent run → trials (Ray Tune) → summary.

Each trial is a normal Orchard job (``trial.py``) on the data prepared here, tracked as a child run of
the parent run, which holds the search space (params), the trials table and figure, the best trial's
config, metrics and model, and for an architecture search the accuracy / size / latency Pareto front.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from orchard.config import JobSpec, SpecError, validate_spec
from orchard.tune.pareto import is_architecture_search, pareto_front
from orchard.tune.space import decode, param_space
from orchard.tune.trial import TRIAL_TAG, TrialContext, run_trial

log = logging.getLogger("orchard.tune")


def run_tune(spec: JobSpec, console: Console | None = None, resume: bool = False):
    from orchard.console import engine_output_to
    from orchard.runner import _check_tracking, _energy_meter, _prepare, _progress, _step, run_dir_for

    console = console or Console()
    if resume:
        raise SpecError("--resume: a kind: tune job cannot be resumed; run it again")
    base = _trial_base(spec)
    run_dir = run_dir_for(spec)
    log_path = run_dir / "engine.log"
    meter = _energy_meter(spec)  # the whole search's energy (every trial runs on this machine) on the parent
    t0 = time.perf_counter()
    with engine_output_to(log_path, console) as term, _progress(term) as progress:
        _check_tracking(spec)
        prepared = _step(progress, "prepare data once (Spark)", lambda: _prepare(validate_spec(base), log_path))
        summary = _search(spec, base, prepared, progress, run_dir, _step, meter)
    summary.wall_s = time.perf_counter() - t0
    summary.log_path = log_path
    return summary


def _trial_base(spec: JobSpec) -> dict[str, Any]:
    """The trial spec before sampling, with the paths trials need made absolute (they run in Ray actors)."""
    from orchard.tracking import resolve_uri

    raw = spec.trial_raw()
    raw["tracking"]["uri"] = resolve_uri(spec)
    raw["tracking"]["register"] = None  # the search registers its best model once, not every trial's
    raw["scaling"]["storage_path"] = str(Path(spec.scaling.storage_path).resolve())
    trial = validate_spec(raw, origin=f"{spec.name} (trial spec)")
    if trial.kind == "federated":
        from orchard.federated.strategies import check_strategy

        check_strategy(trial)
    return raw


def _cpus_per_trial(spec: JobSpec, base: JobSpec) -> float:
    own = spec.tune.trial_resources.get("cpu", 1)
    if base.kind == "train":  # the trial's Ray Train workers, and one CPU for Ray Data's read tasks
        return own + base.scaling.num_workers * base.scaling.cpus_per_worker + 1
    return base.federated.client_cpus or 1  # one trial at a time; its ServerApp thread reserves nothing


def _search(spec: JobSpec, base_raw: dict[str, Any], prepared, progress, run_dir: Path, step, meter=None):
    from orchard.raystart import start_ray
    from orchard.runner import JobSummary
    from orchard.tracking import JobRun

    t = spec.tune
    base = validate_spec(base_raw)
    job = JobRun(spec)
    started = False
    try:
        if meter is not None:
            job.attach_energy(meter)
        job.log_dataset(prepared)
        started = start_ray(t.max_concurrent_trials * _cpus_per_trial(spec, base))
        results, released = step(progress, f"search: {t.num_samples} × {t.searcher} trials (Ray Tune)",
                                 lambda: _fit(spec, base_raw, base, prepared, job, run_dir))
        job.log_metrics({"tune/released_groups": released}, step=0)
        best, model_uri = step(progress, "log trials, best trial and model (MLflow)",
                               lambda: _summarise(spec, base, prepared, job, results, run_dir))
        job.log_artifact(run_dir / "engine.log", "logs")
    except BaseException:
        job.finish("FAILED")
        raise
    finally:
        if started:  # a Ray this job joined (a cluster, a Ray job) is not ours to stop
            import ray

            ray.shutdown()
    job.finish("FINISHED")
    if spec.tracking.register and model_uri:
        from orchard.deploy.registry import register

        version = step(progress, "register best model (MLflow)",
                       lambda: register(job.uri, model_uri, spec.tracking.register,
                                                {k: v for k, v in best["metrics"].items()
                                                 if k.startswith("test/") and v is not None}))
        model_uri = f"models:/{spec.tracking.register}/{version}"
    headline = ("R²", best["metrics"]["test/r2"]) if "test/r2" in best["metrics"] else (
        "accuracy", best["metrics"].get("test/accuracy", float("nan")))
    return JobSummary(name=spec.name, kind=spec.kind, engine=f"Ray Tune ({len(results)} {base.kind} trials, "
                      f"best {best['trial']})", headline=headline, test_f1=best["metrics"].get("test/f1"),
                      wall_s=0.0, run_id=job.run_id, tracking_uri=job.uri, quarantined=prepared.quarantined,
                      log_path=run_dir, model_uri=model_uri)


def _fit(spec: JobSpec, base_raw: dict[str, Any], base: JobSpec, prepared, job, run_dir: Path):
    import os

    from ray import tune

    t = spec.tune
    space, encoded = param_space(t)
    ctx = TrialContext(base=base_raw, encoded=encoded, prepared_path=str(prepared.path.resolve()),
                       parent_run_id=job.run_id, models_dir=str((run_dir / "trial-models").resolve()),
                       groups_dir=str((run_dir / "trial-groups").resolve()),
                       cwd=os.getcwd(), metric=t.metric)
    resources = {"cpu": t.trial_resources.get("cpu", 1), "gpu": t.trial_resources.get("gpu", 0)}
    if base.kind == "federated":  # Flower's client pool counts every CPU of the cluster as its own
        resources = {"cpu": 0, "gpu": 0, "memory": 64 * 2**20}  # Tune refuses an empty reservation
    release = _release_groups(Path(ctx.groups_dir))
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=t.metric, mode=t.direction(), num_samples=t.num_samples,
                                    search_alg=_searcher(spec), scheduler=_scheduler(spec, base),
                                    max_concurrent_trials=t.max_concurrent_trials),
        run_config=tune.RunConfig(name=f"{spec.name}-{job.run_id}", verbose=0,
                                  callbacks=[release],
                                  storage_path=str((Path(base.scaling.storage_path) / "tune").resolve()),
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    return tuner.fit(), release.removed


def _release_groups(folder: Path):
    """When a trial ends (finished, stopped by the scheduler, failed), remove its Ray Train placement groups
    that are left (see trial._group_recorder): a stopped trial's would hold their CPUs until the job ends."""
    from ray import tune
    from ray._raylet import PlacementGroupID
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    class ReleaseGroups(tune.Callback):
        removed = 0

        def _release(self, trial) -> None:
            table = placement_group_table()
            for f in (folder / trial.trial_id).glob("*") if (folder / trial.trial_id).is_dir() else []:
                if table.get(f.name, {}).get("state") == "REMOVED":
                    continue  # the trial ended on its own and Ray Train removed it
                try:
                    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(f.name))))
                    self.removed += 1
                    log.info("trial %s: removed its leftover worker placement group %s", trial.trial_id, f.name)
                except Exception as exc:  # noqa: BLE001 - already gone is fine
                    log.info("trial %s: placement group %s: %s", trial.trial_id, f.name, exc)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release(trial)

    return ReleaseGroups()


def _searcher(spec: JobSpec):
    t = spec.tune
    if t.searcher != "optuna":
        return None  # Ray's variant generator: random sampling, with grid_search axes expanded
    from optuna.samplers import TPESampler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(sampler=TPESampler(seed=t.seed)), max_concurrent=t.max_concurrent_trials)


def _scheduler(spec: JobSpec, base: JobSpec):
    t = spec.tune
    if t.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # One report per epoch (train) or round (federated): training_iteration counts them. ASHA stops a trial
    # whose count reaches max_t, so one past the last report: a trial that got there ends on its own, tested.
    steps = base.train.epochs if base.kind == "train" else base.federated.rounds
    return ASHAScheduler(time_attr="training_iteration", max_t=steps + 1, grace_period=min(t.grace_period, steps),
                         reduction_factor=t.reduction_factor)


def _summarise(spec: JobSpec, base: JobSpec, prepared, job, results, run_dir: Path):
    import torch

    from orchard.runner import _input_example
    from orchard.tracking.tune import child_runs, close_stopped, log_pareto, log_search

    t = spec.tune
    keys = list(t.space)
    _, encoded = param_space(t)
    runs = child_runs(job.uri, job.experiment_id, job.run_id, TRIAL_TAG)
    stopped = close_stopped(job.uri, runs, {_trial_id(r) for r in results if r.error})
    runs = child_runs(job.uri, job.experiment_id, job.run_id, TRIAL_TAG)
    models = run_dir / "trial-models"
    rows = []
    for r in results:
        trial_id = _trial_id(r)
        run = runs.get(trial_id)
        metrics = dict(run.data.metrics) if run else {}
        rows.append({"trial": trial_id, "run_id": run.info.run_id if run else None,
                     "status": "ERROR" if r.error else (run.info.status if run else "UNKNOWN"),
                     "config": decode({k: r.config.get(k) for k in keys}, encoded),
                     t.metric: (r.metrics or {}).get(t.metric),
                     "epochs_or_rounds": (r.metrics or {}).get("training_iteration"),
                     "metrics": {k: v for k, v in metrics.items() if k.startswith(("val/", "test/", "fed/val_",
                                                                                   "arch/"))},
                     "params": metrics.get("arch/params"), "latency": metrics.get("arch/latency_ms_per_row"),
                     "model": models / f"{trial_id}.pt"})
    done = [r for r in rows if r["status"] == "FINISHED" and r[t.metric] is not None and r["model"].is_file()]
    if not done:
        errors = [str(r.error) for r in results if r.error][:1]
        raise RuntimeError(f"no trial of {len(rows)} finished" + (f"; first error: {errors[0]}" if errors else ""))
    best = (max if t.direction() == "max" else min)(done, key=lambda r: r[t.metric])
    log_search(job, rows, keys, t.metric, t.direction(), best)
    job.log_metrics({"tune/trials": len(rows), "tune/finished": len(done), "tune/stopped_early": stopped,
                     "tune/errors": sum(1 for r in results if r.error)}, step=0)
    if is_architecture_search(keys):
        scored = [r for r in rows if r[t.metric] is not None and r["params"] is not None]
        front = pareto_front([(r[t.metric], r["params"], r["latency"]) for r in scored],
                             (t.direction(), "min", "min"))
        log_pareto(job, scored, keys, t.metric, front)
    model = torch.load(best["model"], weights_only=False)
    job.describe(prepared.manifest, None, sum(p.numel() for p in model.parameters()))
    model_uri = job.log_model(model, _input_example(prepared)) if spec.tracking.log_model else None
    return best, model_uri


def _trial_id(result) -> str:
    """The Tune trial id of a result (the MLflow child run carries it as a tag)."""
    import re

    if result.metrics and "trial_id" in result.metrics:
        return str(result.metrics["trial_id"])
    m = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(result.path).name)  # a trial that never reported
    return m.group(1) if m else Path(result.path).name
