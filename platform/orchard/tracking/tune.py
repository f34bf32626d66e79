"""What a search leaves on its parent run: the trials table, their figure, the best trial, the Pareto front.

The trials are child runs (tag ``mlflow.parentRunId``) opened by each trial; this module finds them,
closes those a scheduler stopped mid-run, and logs the summary. Plain data in, no engine imported.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

TRIALS_FIGURE = "plots/tune_trials.png"
PARETO_FIGURE = "plots/pareto_front.png"
TRIALS_TABLE = "tune/trials.json"
PARETO_TABLE = "tune/pareto_front.json"


def child_runs(uri: str, experiment_id: str, parent_run_id: str, trial_tag: str) -> dict[str, Any]:
    """trial id -> its MLflow child run."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(uri).search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                         max_results=10_000)
    return {r.data.tags[trial_tag]: r for r in runs if trial_tag in r.data.tags}


def close_stopped(uri: str, runs: dict[str, Any], errored: set[str]) -> int:
    """Child runs of trials Tune saw no error from that did not finish were stopped by the scheduler: their
    actor was killed mid-run (the run left RUNNING) or their engine failed as it was taken down (FAILED).
    They end as KILLED. ``errored``: trial ids whose failure Tune recorded, left as they are."""
    from mlflow.tracking import MlflowClient

    client, n = MlflowClient(uri), 0
    for trial_id, run in runs.items():
        if trial_id not in errored and run.info.status in ("RUNNING", "FAILED"):
            client.set_terminated(run.info.run_id, "KILLED")
            client.set_tag(run.info.run_id, "orchard.tune_stopped", "early (scheduler)")
            n += 1
    return n


def log_search(job, rows: list[dict[str, Any]], keys: list[str], metric: str, mode: str,
               best: dict[str, Any] | None) -> None:
    """Trials table + figure (metric against each searched key) and the best trial's config and metrics."""
    from orchard.tracking import plots

    columns = ["trial", "status", "run_id", metric, "epochs_or_rounds", *keys]
    job.log_table(columns, [[_cell(r.get(c)) for c in columns] for r in rows], TRIALS_TABLE)
    fig = trials_figure(rows, keys, metric, mode)
    try:
        job.log_figure(fig, TRIALS_FIGURE)
    finally:
        plots.close(fig)
    if best is not None:
        job.log_text(json.dumps({"trial": best["trial"], "run_id": best["run_id"], "config": best["config"],
                                 "metrics": best["metrics"]}, indent=1, default=str), "tune/best.json")
        from mlflow.tracking import MlflowClient

        MlflowClient(job.uri).log_batch(job.run_id, params=_params({f"best.{k}": v for k, v in best["config"].items()}))
        job.log_metrics({f"best/{k}": v for k, v in best["metrics"].items()}, step=0)
        job.set_tags({"orchard.best_trial": best["trial"], "orchard.best_run_id": best["run_id"]})


def _params(d: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in d.items()]


def _cell(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, list | dict) else v


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def trials_figure(rows: list[dict[str, Any]], keys: list[str], metric: str, mode: str):
    """One panel per searched key: each trial's metric against its value (categorical keys as labels);
    trials stopped early are hollow, the best is a star."""
    import matplotlib.pyplot as plt

    n = max(1, len(keys))
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.6), squeeze=False)
    scored = [r for r in rows if r.get(metric) is not None]
    best = (max if mode == "max" else min)(scored, key=lambda r: r[metric]) if scored else None
    for ax, key in zip(axes[0], keys or ["trial"], strict=False):
        values = [r["config"].get(key) if key != "trial" else i for i, r in enumerate(scored)]
        if _numeric(values):
            xs = values
        else:
            labels = sorted({_cell(v) for v in values}, key=str)
            xs = [labels.index(_cell(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        for x, r in zip(xs, scored, strict=True):
            done = r["status"] == "FINISHED"
            ax.scatter([x], [r[metric]], s=120 if r is best else 30, marker="*" if r is best else "o",
                       facecolors="C1" if r is best else ("C0" if done else "none"), edgecolors="C1" if r is best else "C0")
        if key.endswith(("lr", "weight_decay")) and _numeric(values) and all(v > 0 for v in values):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{len(rows)} trials: {metric} (filled: ran to the end; hollow: stopped early; star: best)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def log_pareto(job, rows: list[dict[str, Any]], keys: list[str], metric: str, front: list[bool]) -> None:
    """The accuracy / parameter count / CPU latency table of every scored trial and its front, with a figure."""
    from orchard.tracking import plots

    columns = ["trial", metric, "params", "latency_ms_per_row", "pareto", *keys]
    table = [[r["trial"], r[metric], r["params"], r["latency"], on, *[_cell(r["config"].get(k)) for k in keys]]
             for r, on in zip(rows, front, strict=True)]
    job.log_table(columns, table, PARETO_TABLE)
    fig = pareto_figure(rows, metric, front)
    try:
        job.log_figure(fig, PARETO_FIGURE)
    finally:
        plots.close(fig)


def pareto_figure(rows: list[dict[str, Any]], metric: str, front: list[bool]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "params", "parameters"), (axes[1], "latency", "CPU ms per row (1 thread)")):
        on = sorted((r[key], r[metric]) for r, f in zip(rows, front, strict=True) if f)
        off = [(r[key], r[metric]) for r, f in zip(rows, front, strict=True) if not f]
        if off:
            ax.scatter(*zip(*off, strict=True), s=25, c="C0", alpha=0.6, label="trial")
        if on:
            ax.plot(*zip(*on, strict=True), "-o", c="C3", ms=6, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{metric} against model size and latency (front over all three)", fontsize=9)
    fig.tight_layout()
    return fig
