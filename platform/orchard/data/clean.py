"""Cleaning: count what parsing kept and quarantined (``rowparse`` gives the reasons); labels become indices.

Nothing is silently dropped or turned into nulls: the only rows that leave the pipeline are
quarantined (counted, written with their reason) or exact duplicates (counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from orchard.config import SpecError
from orchard.data.source import Source

# A label column with more distinct values than this is almost surely not a class label.
MAX_CLASSES = 10_000
# With data.task: auto, a numeric label is taken as classes only when every value is a whole number and
# there are at most this many of them (CIFAR-100 still passes); anything else looks like a measurement.
# Like scikit-learn's type_of_target, a non-integer float means "continuous" whatever the count.
MAX_AUTO_CLASSES = 100


@dataclass(frozen=True)
class Tally:
    input: int
    quarantined: int
    classes: list[Any]  # sorted; numbers when every label is a number, else strings
    index: dict[str, int]  # label as read (trimmed) -> class index


def tally(parsed: DataFrame, source: Source, regression: bool, auto: bool = False) -> Tally:
    """One aggregate: input and quarantine counts and the sorted distinct labels of the clean rows.

    ``parsed`` holds the parsed rows with ``_ok`` (no ``_reason``). ``auto`` (data.task: auto) refuses a
    numeric label that looks continuous (see MAX_AUTO_CLASSES). A regression target has no classes.
    """
    ok = F.col("_ok")
    label = F.lit(None).cast("string") if regression else F.when(ok, F.col("_lab"))
    groups = (parsed.groupBy(ok.alias("ok"), label.alias("_lab"))
              .agg(F.count(F.lit(1)).alias("n"), F.min("_reason").alias("reason"))
              .withColumn("num", F.col("_lab").try_cast("double")).limit(MAX_CLASSES + 2).collect())
    total = sum(g["n"] for g in groups)
    bad = [g for g in groups if not g["ok"]]
    quarantined = sum(g["n"] for g in bad)
    if regression:
        return Tally(total, quarantined, [], {})
    labels = {g["_lab"]: g["num"] for g in groups if g["ok"]}
    if auto:
        _refuse_continuous(labels, source)
    if len(labels) > MAX_CLASSES:
        raise SpecError(
            f"data.label: column {source.label!r} of {source.describe()} has over {MAX_CLASSES} distinct "
            "values; a classification label is expected"
        )
    classes, index = _classes(labels)
    if len(classes) < 2:
        hint = f"; all {quarantined} rows were quarantined, e.g. {bad[0]['reason']}" if bad and not labels else ""
        raise SpecError(
            f"data.label: column {source.label!r} of {source.describe()} has {len(classes)} distinct "
            f"value(s) among clean rows, at least 2 classes are needed{hint}"
        )
    return Tally(total, quarantined, classes, index)


def indexed(clean: DataFrame, tally: Tally, regression: bool = False) -> DataFrame:
    """The clean rows with ``label`` as an int64 class index (or the double target for regression)."""
    if regression:
        label = F.col("_lab").try_cast("double")
    else:
        pairs = [F.lit(x) for key, i in sorted(tally.index.items()) for x in (key, i)]
        label = F.create_map(*pairs)[F.col("_lab")].cast("long")
    return clean.select("_v", "_k", "_g", "_s", label.alias("label"))


def _refuse_continuous(labels: dict[str, float | None], source: Source) -> None:
    numbers = list(labels.values())
    if not numbers or not all(v is not None and math.isfinite(v) for v in numbers):
        return  # text labels are class names
    fractional = next((key for key, v in labels.items() if not v.is_integer()), None)
    distinct = len(set(numbers))
    if fractional is None and distinct <= MAX_AUTO_CLASSES:
        return
    many = f"over {MAX_CLASSES}" if len(labels) > MAX_CLASSES else str(distinct)
    why = (f"non-integer values such as {fractional}" if fractional is not None
           else f"{many} distinct integer values (task: auto takes at most {MAX_AUTO_CLASSES} as classes)")
    raise SpecError(
        f"data.task: label column {source.label!r} of {source.describe()} is numeric with {why}; it looks "
        "like a continuous target. Set data.task: regression to predict it, or data.task: classification "
        "to treat each value as a class"
    )


def _classes(labels: dict[str, float | None]) -> tuple[list[Any], dict[str, int]]:
    """Sorted classes and each label string's index; "1" and "1.0" are one numeric class."""
    numbers = list(labels.values())
    if labels and all(v is not None and math.isfinite(v) for v in numbers):
        distinct = sorted(set(numbers))
        integral = all(v.is_integer() and abs(v) < 2**53 for v in distinct)
        classes: list[Any] = [int(v) for v in distinct] if integral else distinct
        position = {v: i for i, v in enumerate(distinct)}
        return classes, {key: position[v] for key, v in labels.items()}
    classes = sorted(labels)
    return classes, {key: i for i, key in enumerate(classes)}
