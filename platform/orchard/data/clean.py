"""Cleaning: every row either parses completely or goes to quarantine with a reason; labels become indices.

Nothing is silently dropped or turned into nulls: the only rows that leave the pipeline are
quarantined (counted, written with their reason) or exact duplicates (counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import StringType

from orchard.config import SpecError
from orchard.data.manifest import GROUP_COL
from orchard.data.readers import GROUP_RAW, SPLIT_RAW, category_col, feature_col
from orchard.data.source import Source

# A label column with more distinct values than this is almost surely not a class label.
MAX_CLASSES = 10_000
# With data.task: auto, a numeric label is taken as classes only when every value is a whole number and
# there are at most this many of them (CIFAR-100 still passes); anything else looks like a measurement.
# Like scikit-learn's type_of_target, a non-integer float means "continuous" whatever the count.
MAX_AUTO_CLASSES = 100


def value_col(i: int) -> str:
    """The parsed (double) value of feature i."""
    return f"_x{i}"


@dataclass(frozen=True)
class Tally:
    input: int
    quarantined: int
    classes: list[Any]  # sorted; numbers when every label is a number, else strings
    index: dict[str, int]  # label as read (trimmed) -> class index


def parse(raw: DataFrame, source: Source, regression: bool = False, group: str | None = None) -> DataFrame:
    """Add parsed features ``_x*``, the trimmed label ``_lab`` and ``_reason`` (null = clean).

    With a partition column ``group``, its trimmed value rides along as ``_g``; a row without one
    belongs to no client and is quarantined.
    """
    n = len(source.features)
    values = [_as_double(F.col(feature_col(i))).alias(value_col(i)) for i in range(n)]
    label = F.trim(F.col("_y").cast("string"))
    checks = [_feature_problem(raw, i, name) for i, name in enumerate(source.features)]
    target = label.try_cast("double")
    numeric = (
        F.when(target.isNull() | F.isnan(target) | (F.abs(target) == math.inf),
               F.concat(F.lit(f"non-numeric target in column '{source.label}': "), label))
        if regression else F.lit(None).cast("string")
    )
    gid = F.trim(F.col(GROUP_RAW).cast("string")) if group else None
    missing_group = (F.when(gid.isNull() | (gid == ""), F.lit(f"empty value in column '{group}' "
                                                             "(federated.partition_by)"))
                     if group else F.lit(None).cast("string"))
    reason = F.coalesce(
        F.col("_problem"),
        F.when(label.isNull() | (label == ""), F.lit(f"empty label in column '{source.label}'")),
        numeric,
        missing_group,
        *checks,
    )
    # A missing category is a value of its own (""), not a broken row.
    cats = [F.coalesce(F.trim(F.col(category_col(j))), F.lit("")).alias(category_col(j))
            for j in range(len(source.categorical))]
    carried = ([gid.alias(GROUP_RAW)] if group else []) + ([SPLIT_RAW] if SPLIT_RAW in raw.columns else [])
    return raw.select("_row", "_raw", *values, *cats, *carried, label.alias("_lab"), reason.alias("_reason"))


def tally(parsed: DataFrame, source: Source, auto: bool = False) -> Tally:
    """One aggregate: input and quarantine counts, and the distinct labels of the clean rows.

    ``auto`` (data.task: auto) refuses a numeric label that looks continuous (see MAX_AUTO_CLASSES).
    """
    clean = F.col("_reason").isNull()
    groups = (
        parsed.groupBy(clean.alias("ok"), F.when(clean, F.col("_lab")).alias("_lab"))
        .agg(F.count(F.lit(1)).alias("n"), F.min("_reason").alias("reason"))
        .withColumn("num", F.col("_lab").try_cast("double"))
        .limit(MAX_CLASSES + 2)
        .collect()
    )
    total = sum(g["n"] for g in groups)
    bad = [g for g in groups if not g["ok"]]
    quarantined = sum(g["n"] for g in bad)
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
        hint = (
            f"; all {quarantined} rows were quarantined, e.g. {bad[0]['reason']}"
            if bad and not labels
            else ""
        )
        raise SpecError(
            f"data.label: column {source.label!r} of {source.describe()} has {len(classes)} distinct "
            f"value(s) among clean rows, at least 2 classes are needed{hint}"
        )
    return Tally(total, quarantined, classes, index)


def tally_regression(parsed: DataFrame) -> Tally:
    """Input and quarantine counts for a regression target (no classes)."""
    row = parsed.agg(F.count(F.lit(1)).alias("n"), F.count("_reason").alias("bad")).first()
    return Tally(int(row["n"]), int(row["bad"]), [], {})


def indexed(parsed: DataFrame, tally: Tally, n_features: int, regression: bool = False,
            n_categorical: int = 0) -> DataFrame:
    """The clean rows with ``label`` as an int64 class index (or the double target for regression).

    A partition column parsed along (``_g``) comes out as ``group``.
    """
    cats = [category_col(j) for j in range(n_categorical)]
    values = [value_col(i) for i in range(n_features)] + cats
    carried = [F.col(GROUP_RAW).alias(GROUP_COL)] if GROUP_RAW in parsed.columns else []
    carried += [SPLIT_RAW] if SPLIT_RAW in parsed.columns else []  # data.split.column (split.assign)
    if regression:
        label = _as_double(F.col("_lab"))
    else:
        pairs = [F.lit(x) for key, i in sorted(tally.index.items()) for x in (key, i)]
        label = F.create_map(*pairs)[F.col("_lab")].cast("long")
    return parsed.filter(F.col("_reason").isNull()).select(*values, *carried, label.alias("label"))


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


def _as_double(value: Column) -> Column:
    parsed = value.try_cast("double")
    # -0.0 and 0.0 are the same number but hash differently; one spelling keeps splits deterministic.
    return F.when(parsed == 0, F.lit(0.0)).otherwise(parsed)


def _feature_problem(raw: DataFrame, i: int, name: str) -> Column:
    value = F.col(feature_col(i))
    parsed = value.try_cast("double")
    is_text = isinstance(raw.schema[feature_col(i)].dataType, StringType)
    empty = value.isNull() | (F.trim(value) == "") if is_text else value.isNull()
    shown = value.cast("string")
    return (
        F.when(empty, F.lit(f"empty value in column '{name}'"))
        .when(parsed.isNull(), F.concat(F.lit(f"non-numeric value in column '{name}': "), shown))
        .when(
            F.isnan(parsed) | (F.abs(parsed) == math.inf),
            F.concat(F.lit(f"non-finite value in column '{name}': "), shown),
        )
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
