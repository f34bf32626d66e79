"""Deduplicate, then split deterministically by feature vector: rows that share features share a split.

Rows are grouped by feature vector (numeric and categorical features; not the label, not the partition
column): every row of one vector lands in the same split, so a vector seen with two labels, or the
same record at two sites, never sits in train and test at once (a model would be scored on rows it
trained on). Each vector gets ``xxhash64(seed, features)``; within a stratum (the vector's smallest
label when stratified, else all rows) vectors are ranked by that hash and a vector goes to train
while fewer than round(n * train) of the stratum's rows come before it, then to val while fewer than
round(n * train) + round(n * val), else to test. With one row per vector (the usual case) that is exactly
"the first round(n * train) rows"; a vector of k rows can move a split's size by at most k - 1 rows.
A vector's split depends on its features, the other vectors of its stratum and the seed; no step
depends on partitioning or arrival order, so the same input and seed give the same splits on any
number of cores.

With ``split.column`` the source's own assignment (train/val/test, read as ``_s``) replaces the hashed
one and the fractions; duplicates are then dropped within a split only, so a benchmark's test set is
kept as published (a vector in two splits is counted in ``overlap``). ``predefined_problem`` names the
rows whose value is not a split (quarantined); ``sample`` keeps a seeded sample of the raw rows.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from orchard.config import SplitSpec
from orchard.data.clean import value_col
from orchard.data.manifest import GROUP_COL
from orchard.data.readers import SPLIT_RAW, category_col

SPLIT_VALUES = ("train", "val", "test")

# Columns assign() adds for the prep's own bookkeeping (see shared()).
SHARED = "_shared"  # the row's feature vector is shared with another distinct row
CONFLICT = "_conflict"  # ... and that vector carries more than one label


def assign(clean: DataFrame, split: SplitSpec, n_features: int, by_class: bool = True,
           n_categorical: int = 0) -> DataFrame:
    """Distinct rows with ``split`` (train/val/test), a seeded shuffle key ``_order`` and ``_shared``/``_conflict``.

    ``_rank`` (the row's rank within its stratum) breaks ``_order`` ties, so (``_order``, ``label``,
    ``_rank``) orders rows totally.
    """
    keys = [value_col(i) for i in range(n_features)] + [category_col(j) for j in range(n_categorical)]
    # The same record at two sites is two clients' data, not a duplicate: the partition column is content.
    grouped = [GROUP_COL] if GROUP_COL in clean.columns else []
    predefined = [SPLIT_RAW] if split.column is not None else []
    content = [*keys, "label", *grouped, *predefined]
    distinct = clean.dropDuplicates(content)
    vector = Window.partitionBy(*keys)
    # A regression target has no classes to stratify by: its rows are one stratum.
    stratum = F.min("label").over(vector) if split.stratify and by_class else F.lit(0)
    key = _hash(split.seed, [F.col(k) for k in keys])
    with_stratum = distinct.select(*content, stratum.alias("_stratum"), key.alias("_key"),
                                   F.count(F.lit(1)).over(vector).alias("_n"),
                                   (F.min("label").over(vector) != F.max("label").over(vector)).alias(CONFLICT))
    # The features after the hash break hash ties, so one vector's rows are adjacent and the order is
    # total (label and partition column order rows inside a vector); never arrival order.
    ranked = Window.partitionBy("_stratum").orderBy("_key", *keys, "label", *grouped)
    rank = F.row_number().over(ranked) - 1
    rows = with_stratum.select("*", rank.alias("_rank"),
                               F.count(F.lit(1)).over(Window.partitionBy("_stratum")).alias("_size"))
    # Rows of the stratum ranked before this vector's first row.
    before = F.min("_rank").over(vector)
    size = F.col("_size")
    n_train, n_val = _rounded(size * split.train), _rounded(size * split.val)
    which = F.when(before < n_train, "train").when(before < n_train + n_val, "val").otherwise("test")
    if predefined:
        which = F.col(SPLIT_RAW)
    order = _hash(split.seed, [F.lit("shuffle"), *(F.col(c) for c in content)])
    return rows.select(*content, which.alias("split"), order.alias("_order"), "_rank",
                       (F.col("_n") > 1).alias(SHARED), F.col(CONFLICT))


def predefined_problem(raw: DataFrame, column: str) -> DataFrame:
    """``raw`` with ``_s`` trimmed and lower-cased, and rows whose ``_s`` is no split given a ``_problem``."""
    value = F.lower(F.trim(F.col(SPLIT_RAW).cast("string")))
    bad = F.when(value.isNull() | ~value.isin(*SPLIT_VALUES),
                 F.concat(F.lit(f"value in split column '{column}' is not train/val/test: "),
                          F.coalesce(F.col(SPLIT_RAW).cast("string"), F.lit("(empty)"))))
    return raw.withColumn("_problem", F.coalesce(F.col("_problem"), bad)).withColumn(SPLIT_RAW, value)


def sample(raw: DataFrame, size: float | int, seed: int) -> DataFrame:
    """A seeded sample of the raw rows, chosen by a hash of the row number (not by partitioning).

    A fraction keeps each row whose hash falls below it (about ``size * n`` rows); a count keeps the
    ``size`` rows of smallest hash.
    """
    key = _hash(seed, [F.lit("sample"), F.col("_row")])
    if isinstance(size, float):
        unit = F.pmod(key, F.lit(1 << 52)).cast("double") / float(1 << 52)
        return raw.filter(unit < F.lit(size))
    return raw.withColumn("_sample", key).orderBy("_sample", "_row").limit(size).drop("_sample")


def shared(rows: DataFrame) -> dict[str, int]:
    """Distinct rows in all, and how many share their feature vector (with another label: ``conflicting_labels``)."""
    got = rows.agg(F.count(F.lit(1)).alias("n"), F.count(F.when(F.col(SHARED), 1)).alias("shared"),
                   F.count(F.when(F.col(CONFLICT), 1)).alias("conflict")).first()
    return {"rows": int(got["n"]), "shared_features": int(got["shared"]),
            "conflicting_labels": int(got["conflict"])}


def _hash(seed: int, cols: list[Column]) -> Column:
    return F.xxhash64(F.lit(seed).cast("long"), *cols)


def _rounded(x: Column) -> Column:
    # Half-up rounding per stratum keeps every split within one row of its target share.
    return F.floor(x + F.lit(0.5))
