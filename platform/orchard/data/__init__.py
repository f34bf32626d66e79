"""Spark data preparation: a job spec's ``data`` section in, Parquet splits + manifest.json out.

Importing this package does not import pyspark; ``prepare`` imports it only when a prep must run,
and ``spark_session`` when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from orchard.data.errors import EngineError
from orchard.data.manifest import PreparedData, load_manifest
from orchard.data.prepare import prepare

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from orchard.config import SparkSpec

__all__ = ["EngineError", "PreparedData", "load_manifest", "prepare", "spark_session"]


def spark_session(spec: SparkSpec | None = None, log_path: Path | None = None) -> SparkSession:
    """The process's SparkSession (local mode, no UI, quiet logs); see ``orchard.data.session``."""
    from orchard.data.session import spark_session as start

    return start(spec, log_path)
