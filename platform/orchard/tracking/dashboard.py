"""What MLflow's dashboard shows for an Orchard job: the training view, a run description and a source.

MLflow 3.17's UI decides an experiment's view from a *workflow type* (``genai`` or ``machine_learning``):
the ``workflowType`` query parameter of the page URL, else the browser's stored choice, else ``genai``
(the GenAI overview: traces, tokens, an assistant). The experiment tag ``mlflow.experimentKind`` is what
the UI reads when that switch is off, and what its experiment-type selector writes; Orchard sets both the
tag and, in every URL it prints, ``workflowType=machine_learning``.

Plain functions of the spec and results; no engine imports.
"""

from __future__ import annotations

import getpass
import os
import shlex
import sys
from pathlib import Path
from typing import Any

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # the UI's "Machine learning" experiment type
WORKFLOW_QUERY = "workflowType=machine_learning"
NOTE_TAG = "mlflow.note.content"  # the run page's Description (markdown)
SOURCE_NAME_TAG, SOURCE_TYPE_TAG = "mlflow.source.name", "mlflow.source.type"
USER_TAG = "mlflow.user"  # the Overview's "Created by"


def experiment_tags() -> dict[str, str]:
    """Tags of an experiment Orchard creates (or adopts): it holds model-training runs, not GenAI traces."""
    return {EXPERIMENT_KIND_TAG: TRAINING_KIND}


def run_tags(spec, spec_path: str | None = None) -> dict[str, str]:
    """Source tags for the run's Overview: the spec file (else the command), JOB under a Ray job, else LOCAL."""
    spec_path = spec_path or _spec_path_from_argv()
    name = str(Path(spec_path).resolve()) if spec_path else invoked_command(spec)
    kind = "JOB" if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID") else "LOCAL"
    return {SOURCE_NAME_TAG: name, SOURCE_TYPE_TAG: kind, USER_TAG: _user()}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return "unknown"


def _orchard_argv() -> list[str] | None:
    argv = sys.argv
    if len(argv) > 1 and Path(argv[0]).name in ("orchard", "cli.py", "job_entry.py", "__main__.py"):
        return argv[1:]
    return None


def _spec_path_from_argv() -> str | None:
    """The SPEC of ``orchard run|submit|prep SPEC`` when this process is that command."""
    args = _orchard_argv()
    if args and len(args) > 1 and args[0] in ("run", "prep", "submit") and Path(args[1]).is_file():
        return args[1]
    return None


def invoked_command(spec) -> str:
    """The ``orchard ...`` command line that started this process, else ``orchard run <job name>``."""
    args = _orchard_argv()
    return shlex.join(["orchard", *args]) if args else f"orchard run {spec.name}"


def experiment_url(base_url: str, experiment_id: str | None = None) -> str:
    """The dashboard address that opens the training view (the experiment's runs, or the experiment list)."""
    page = f"experiments/{experiment_id}/runs" if experiment_id else "experiments"
    return f"{base_url.rstrip('/')}/#/{page}?{WORKFLOW_QUERY}"


def run_description(spec, manifest: dict[str, Any], headline: tuple[str, float] | None,
                    model_params: int | None) -> str:
    """A few markdown lines: what job, on what data, with what model, and the headline result."""
    engine = (f"Ray Train, {spec.scaling.num_workers} workers" if spec.kind != "federated"
              else f"Flower, {spec.federated.clients} clients, {spec.federated.rounds} rounds")
    counts = manifest.get("counts", {})
    rows = ", ".join(f"{k} {counts[k]}" for k in ("train", "val", "test") if k in counts)
    data = f"`{manifest.get('source', spec.data.source)}` ({manifest.get('task', spec.data.task)}"
    data += f"; rows: {rows})" if rows else ")"
    size = f", {model_params:,} parameters" if model_params is not None else ""
    lines = [f"**{spec.name}**: Orchard `{spec.kind}` job ({engine}).",
             f"- data: {data}",
             f"- model: {spec.model.family}{size}"]
    if spec.kind != "federated":
        epochs = f"up to {spec.train.epochs} epochs (early stopping)" if spec.train.early_stopping \
            else f"{spec.train.epochs} epochs"
        lines.append(f"- training: {epochs}, {spec.train.optimizer}, lr {spec.train.lr:g}")
    if headline is not None:
        lines.append(f"- result: test {headline[0]} **{headline[1]:.4f}**")
    lines.append(f"- command: `{invoked_command(spec)}`")
    return "\n".join(lines)


def experiment_links(server_url: str, limit: int = 5) -> list[tuple[str, str]]:
    """(name, training-view URL) of the store's most recently updated experiments, via the running server."""
    from mlflow.tracking import MlflowClient

    try:
        exps = MlflowClient(server_url).search_experiments(max_results=limit + 1,
                                                           order_by=["last_update_time DESC"])
    except Exception:  # noqa: BLE001 - the links are a convenience; the dashboard itself is up
        return []
    return [(e.name, experiment_url(server_url, e.experiment_id)) for e in exps if e.name != "Default"][:limit]
