"""The partition column: a source column that names each row's client, carried through prep beside the label.

A federated job with ``partition: natural`` divides the training split by a column of the source (a site,
a user). That column is not a feature by default; the prep writes it as an extra string column ``group``
in every split, so partitioning needs no second look at the source. Readers that select
``[features, label]`` never see it. Plain Python (no Spark): a bad column is refused before a JVM starts.
"""

from __future__ import annotations

import dataclasses
import hashlib

from orchard.config import DataSpec, JobSpec, SpecError
from orchard.data.source import Source


def partition_column(spec: JobSpec) -> str | None:
    """The source column the prep must carry: only a federated job with a natural partition needs one."""
    fed = spec.federated
    if spec.kind == "federated" and fed.partition == "natural":
        return fed.partition_by
    return None


def with_group(source: Source, data: DataSpec, column: str) -> Source:
    """``source`` with ``column`` checked and, unless listed explicitly, dropped from the default features."""
    if source.kind == "sklearn":
        raise SpecError(f"federated.partition_by: {source.describe()} has no column {column!r} "
                        "(natural partitions need a CSV or Parquet source with a client column)")
    if column not in source.columns:
        shown = ", ".join(source.columns[:8]) + (f", … ({len(source.columns)} in all)" if len(source.columns) > 8 else "")
        raise SpecError(f"federated.partition_by: column {column!r} not found in {source.describe()} "
                        f"(columns: {shown})")
    if column == source.label:
        raise SpecError(f"federated.partition_by: {column!r} is the label column (data.label)")
    # With data.features unset every column but the label was taken; the client id is not a feature unless
    # asked for, since a model that sees it learns the sites rather than the task.
    features = source.features if data.features is not None else tuple(f for f in source.features if f != column)
    categorical = source.categorical
    if not features and not categorical:
        raise SpecError(f"data.features: {source.describe()} has no feature columns besides the label "
                        f"and federated.partition_by ({column!r})")
    return dataclasses.replace(source, features=features)


def keyed(digest: str, column: str | None) -> str:
    """The content hash, extended by the partition column: the written columns differ, so the folder must."""
    if column is None:
        return digest
    return hashlib.sha256(f"{digest}|partition_by={column}".encode()).hexdigest()[:16]
