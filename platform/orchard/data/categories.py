"""Categorical columns: a vocabulary fitted on the training split, indices for every split.

Index 0 is reserved for a value the training split never saw (including a category that only shows
up in val/test), so no information about val/test leaks into the vocabulary.
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from orchard.config import SpecError

MAX_VOCABULARY = 100_000


def fit(train: DataFrame, names: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """(column name, sorted distinct training values) per categorical column (``_k``), in one Spark job."""
    if not names:
        return []
    aggs = [F.array_sort(F.slice(F.collect_set(F.col("_k")[j]), 1, MAX_VOCABULARY + 1)).alias(f"v{j}")
            for j in range(len(names))]
    row = train.agg(*aggs).first()
    vocab = []
    for j, name in enumerate(names):
        values = list(row[f"v{j}"] or [])
        if len(values) > MAX_VOCABULARY:
            raise SpecError(f"data.categorical: column {name!r} has over {MAX_VOCABULARY} distinct values")
        vocab.append((name, values))
    return vocab


def describe(vocab: list[tuple[str, list[str]]], first_position: int) -> list[dict[str, Any]]:
    return [{"name": name, "position": first_position + j, "cardinality": len(values) + 1, "vocabulary": values}
            for j, (name, values) in enumerate(vocab)]
