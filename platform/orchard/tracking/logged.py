"""A finished run opened again: what it logged (spec params, manifest, split folders, model), and a place
to add artifacts and metrics afterwards (``orchard explain RUN_ID``).

It offers the logging methods of ``JobRun`` that end-of-run outputs use (``log_figure``, ``log_text``,
``log_metrics``, ``set_tags``), so the same output code writes to a run in progress or to an old one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from orchard.config import SpecError
from orchard.tracking.run import check_reachable, resolve_uri

MANIFEST_ARTIFACT = "data/manifest.json"  # JobRun.log_dataset
CONTEXTS = {"training": "train", "validation": "val", "testing": "test"}  # dataset input context -> split


class LoggedRun:
    """An existing MLflow run, by id. An id the store does not know is a ``SpecError`` naming it."""

    def __init__(self, run_id: str, uri: str | None = None) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException

        self.uri = uri or resolve_uri()
        check_reachable(self.uri)
        self.run_id = run_id
        self._client = mlflow.tracking.MlflowClient(self.uri)
        try:
            self.run = self._client.get_run(run_id)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code) and "INVALID_PARAMETER" not in str(exc.error_code):
                raise
            raise SpecError(f"run {run_id}: no such run in the tracking store {self.uri}") from None

    @property
    def params(self) -> dict[str, str]:
        return dict(self.run.data.params)

    def manifest(self) -> dict[str, Any]:
        """The prepared data's manifest as the run logged it."""
        import mlflow

        try:
            return mlflow.artifacts.load_dict(f"{self.run.info.artifact_uri.rstrip('/')}/{MANIFEST_ARTIFACT}")
        except Exception as exc:  # noqa: BLE001 - missing artifact: the error type depends on the store
            raise SpecError(f"run {self.run_id}: it logged no {MANIFEST_ARTIFACT} (not an orchard run?): {exc}") from None

    def split_folders(self) -> dict[str, Path]:
        """{split: local folder} from the run's dataset inputs (``JobRun.log_dataset`` records each split's URI)."""
        out = {}
        for item in self.run.inputs.dataset_inputs if self.run.inputs else []:
            tags = {t.key: t.value for t in item.tags}
            split = CONTEXTS.get(tags.get("mlflow.data.context", ""))
            try:
                uri = json.loads(item.dataset.source).get("uri", "")
            except (TypeError, ValueError):
                continue
            if split and uri.startswith("file:"):
                out[split] = Path(unquote(urlparse(uri).path))
        return out

    def load_model(self):
        """The run's logged model (``tracking.log_model``), on the CPU in eval mode."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        models = mlflow.search_logged_models(experiment_ids=[self.run.info.experiment_id], output_format="list",
                                             filter_string=f"source_run_id='{self.run_id}'")
        if not models:
            raise SpecError(f"run {self.run_id}: it logged no model (tracking.log_model was false, or the run "
                            "did not get that far)")
        model = mlflow.pytorch.load_model(models[0].model_uri, map_location="cpu")
        try:
            model.eval()
        except (NotImplementedError, RuntimeError):  # an exported (pt2) module: eval-mode already baked in
            pass
        return model

    # -- logging, as JobRun ----------------------------------------------------------------------
    def log_figure(self, fig, path: str) -> None:
        self._client.log_figure(self.run_id, fig, path)

    def log_text(self, text: str, path: str) -> None:
        self._client.log_text(self.run_id, text, path)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))
