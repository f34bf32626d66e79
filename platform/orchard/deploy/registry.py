"""The MLflow Model Registry: register a run's logged model (``tracking.register``), move an alias (``orchard promote``).

MLflow is imported only inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping


class RegistryError(LookupError):
    """A registered model name or version that the registry does not hold (the CLI exits 2 with this message)."""


def register(tracking_uri: str, model_uri: str, name: str, metrics: Mapping[str, float]) -> str:
    """Register ``model_uri`` as a new version of ``name`` with ``metrics`` as version tags; return the version.

    The tags are the run's final test metrics, so a version can be judged (and promoted) from the
    registry alone, without opening its run.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)  # register_model has no URI argument; the registry follows tracking
    tags = {k: repr(float(v)) for k, v in metrics.items()}
    return str(mlflow.register_model(model_uri, name, tags=tags).version)


def promote(tracking_uri: str, name: str, version: str, alias: str) -> None:
    """Point ``alias`` (e.g. champion) of model ``name`` at ``version``; ``models:/NAME@ALIAS`` then serves it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        raise RegistryError(f"no registered model named {name!r} in {tracking_uri}") from exc
    try:
        client.get_model_version(name, str(version))
    except MlflowException as exc:
        known = sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int)
        raise RegistryError(f"model {name!r} has no version {version!r} (versions: "
                            f"{', '.join(known) or 'none'})") from exc
    client.set_registered_model_alias(name, alias, str(version))
