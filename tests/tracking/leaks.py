"""Secrets in a job's environment must never reach what the job leaves behind.

``secret_env()`` makes fresh values for the credentials a job runs with (MLflow's password, an S3 key, the
Ray token); ``leaks()`` looks for each of them in everything a run keeps: params, tags, metrics' names,
every run artifact and every logged model's files (downloaded, searched byte by byte), and any text
(the terminal output, the engine log, ``orchard jobs logs``).
"""

from __future__ import annotations

import uuid
from pathlib import Path

SECRET_NAMES = ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN")


def secret_env() -> dict[str, str]:
    return {name: f"{name.lower()}-{uuid.uuid4().hex}" for name in SECRET_NAMES}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def leaks(uri: str, run_id: str, secrets: dict[str, str], texts: dict[str, str], dst: Path) -> tuple[list[str], int]:
    """Where a secret value appears (``[]`` when nowhere), and how many places were searched."""
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    places: dict[str, bytes] = {f"text {k}": v.encode() for k, v in texts.items()}
    places |= {f"param {k}": f"{k}={v}".encode() for k, v in run.data.params.items()}
    places |= {f"tag {k}": f"{k}={v}".encode() for k, v in run.data.tags.items()}
    places["metric names"] = " ".join(run.data.metrics).encode()
    local = download_artifacts(run_id=run_id, artifact_path="", dst_path=str(dst / "run"), tracking_uri=uri)
    places |= {f"artifact {k}": v for k, v in _files(Path(local)).items()}
    for i, model in enumerate(client.search_logged_models([run.info.experiment_id])):
        local = download_artifacts(artifact_uri=model.artifact_location, dst_path=str(dst / f"model{i}"),
                                   tracking_uri=uri)
        places |= {f"model artifact {k}": v for k, v in _files(Path(local)).items()}
        places[f"model {i} params/tags"] = repr((model.params, model.tags)).encode()
    assert any(k.startswith("artifact ") for k in places), "the run has artifacts to search"
    found = [f"{name} in {where}" for where, blob in places.items()
             for name, value in secrets.items() if value.encode() in blob]
    return found, len(places)
