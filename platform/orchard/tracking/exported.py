"""What ``orchard export`` reads from and writes back to a run: its logged model, spec and prepared data.

The MLflow side of ``orchard.deploy.export``: that module converts and measures, this one only talks to
the store. Bad input (no such store, run or model) raises ``RunLookupError`` with a message naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from orchard.tracking.run import check_reachable, resolve_uri

MODEL_NAME = "model"  # the name JobRun.log_model logs under


class RunLookupError(LookupError):
    """The URI names no store, run or logged model: bad input, not a failure of the export."""


@dataclass
class RunModel:
    """A run's logged model, loaded for inference, and what the run recorded about its data."""

    tracking_uri: str
    run_id: str
    model_uri: str
    module: Any  # an nn.Module (pickle format) or the GraphModule of a torch.export program (pt2)
    spec_yaml: str | None  # the run's spec/resolved.yaml, None if absent
    prepared_path: Path | None  # the prepared-data folder the run's dataset inputs point at


def load_run_model(model_uri: str, tracking_uri: str | None = None) -> RunModel:
    """Resolve ``runs:/<id>/model``, ``models:/...`` or a plain run id, and load that run's model."""
    import mlflow
    from mlflow.exceptions import MlflowException

    # The loads download a few small files each: MLflow's per-download progress bars would fill the terminal.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri or resolve_uri()
    _check_store(uri)
    client = mlflow.tracking.MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    run_id, model_uri = _parse(model_uri)
    if run_id is None:  # models:/...: the run is the one that logged it
        try:
            run_id = mlflow.models.get_model_info(model_uri).run_id
        except MlflowException as exc:
            raise RunLookupError(f"no model {model_uri} in the tracking store {uri}: {_first_line(exc)}") from None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RunLookupError(f"no run {run_id} in the tracking store {uri}") from None
    try:
        module = mlflow.pytorch.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        raise RunLookupError(f"run {run_id} has no loadable PyTorch model at {model_uri} "
                             f"(was it run with tracking.log_model: false?): {_first_line(exc)}") from None
    return RunModel(uri, run_id, model_uri, module, _spec_text(client, run_id), _prepared_path(run))


def _check_store(uri: str) -> None:
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        # MLflow would create an empty store at a mistyped path; an export only reads an existing one.
        path = Path(unquote(uri.split("sqlite:///", 1)[-1])) if uri.startswith("sqlite:///") else None
        if path is not None and not path.is_file():
            raise RunLookupError(f"no tracking store at {path} (tracking URI {uri}): pass --tracking-uri "
                                 "or set MLFLOW_TRACKING_URI to the store the run wrote to")
    elif parsed.scheme in ("http", "https"):
        from orchard.tracking.buffer import TrackingUnavailable

        try:
            check_reachable(uri)
        except TrackingUnavailable as exc:
            raise RunLookupError(str(exc)) from None


def _parse(model_uri: str) -> tuple[str | None, str]:
    """(run id or None, model URI): a bare run id means that run's ``model``."""
    if model_uri.startswith("runs:/"):
        parts = model_uri[len("runs:/"):].strip("/").split("/", 1)
        if not parts[0]:
            raise RunLookupError(f"model URI {model_uri!r} names no run: use runs:/<run_id>/model")
        return parts[0], model_uri
    if model_uri.startswith("models:/"):
        return None, model_uri
    if ":" in model_uri or "/" in model_uri:
        raise RunLookupError(f"model URI {model_uri!r} is not runs:/<run_id>/model, models:/<name>/<version> "
                             "or a run id")
    return model_uri, f"runs:/{model_uri}/{MODEL_NAME}"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _spec_text(client, run_id: str) -> str | None:
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            return Path(client.download_artifacts(run_id, "spec/resolved.yaml", tmp)).read_text()
    except Exception:  # noqa: BLE001 - a run without the artifact: the export uses the logged module as is
        return None


def _prepared_path(run) -> Path | None:
    """The folder of the split the run logged as its testing input (``JobRun.log_dataset``), one level up."""
    inputs = getattr(run.inputs, "dataset_inputs", None) or []
    for dataset_input in inputs:
        context = {t.key: t.value for t in dataset_input.tags}.get("mlflow.data.context")
        if context != "testing":
            continue
        try:
            source = json.loads(dataset_input.dataset.source)
        except (TypeError, ValueError):
            continue
        uri = source.get("uri") if isinstance(source, dict) else None
        if uri and uri.startswith("file:"):
            return Path(unquote(urlparse(uri).path)).parent
    return None


def log_export(run: RunModel, folder: Path, artifact_dir: str, metrics: dict[str, float]) -> None:
    """Every file in ``folder`` under ``artifact_dir`` and ``metrics`` (step 0) onto the run of the model."""
    import time

    import mlflow
    from mlflow.entities import Metric

    client = mlflow.tracking.MlflowClient(run.tracking_uri)
    client.log_artifacts(run.run_id, str(folder), artifact_dir)
    now = int(time.time() * 1000)
    client.log_batch(run.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
