"""Deduplicate, then split deterministically by feature vector: rows that share features share a split.

Rows are grouped by feature vector (numeric and categorical features; not the label, not the partition
column) in one shuffle: one row per vector holds its distinct rows (label, partition value). Every row
of one vector lands in the same split, so a vector seen with two labels, or the
same record at two sites, never sits in train and test at once (a model would be scored on rows it
trained on). Each vector gets ``xxhash64(seed, features)``; within a stratum (the vector's smallest
label when stratified, else all rows) vectors are ranked by that hash and a vector goes to train
while fewer than round(n * train) of the stratum's rows come before it, then to val while fewer than
round(n * train) + round(n * val), else to test. With one row per vector (the usual case) that is exactly
"the first round(n * train) rows"; a vector of k rows can move a split's size by at most k - 1 rows.
A vector's split depends on its features, the other vectors of its stratum and the seed; no step
depends on partitioning or arrival order, so the same input and seed give the same splits on any
number of cores.

Ranking a stratum does not sort it: the top bits of the hash put each vector in one of a few thousand
buckets, one small aggregate counts the rows per (stratum, bucket), and the driver finds the buckets
whose rows all fall before, between or after the split points. Only the (at most two per stratum)
buckets that a split point cuts are ranked exactly, by a window over their few rows.

With ``split.column`` the source's own assignment (train/val/test, read as ``_s``) replaces the hashed
one and the fractions; duplicates are then dropped within a split only, so a benchmark's test set is
kept as published (a vector in two splits is counted in ``overlap``). ``rowparse`` quarantines the
rows whose value is not a split; ``sample`` keeps a seeded sample of the raw rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from orchard.config import SplitSpec

MAX_BUCKET_ROWS = 200_000  # (stratum, bucket) pairs the driver plans over: bounds its memory


@dataclass(frozen=True)
class Assigned:
    """The distinct rows with their split, written once as Parquet partitioned by split."""

    path: Path
    rows: int  # distinct rows in all splits
    overlap: dict[str, int]

    def split(self, spark: SparkSession, name: str) -> DataFrame | None:
        """One split's rows (``_v``, ``_k``, ``label``, ``_g``, ``_order``, ``_tie``), or None if it has none."""
        folder = self.path / f"split={name}"
        return spark.read.parquet(str(folder)) if folder.is_dir() else None


def assign(spark: SparkSession, clean: DataFrame, split: SplitSpec, by_class: bool, stage: Path,
           classes: int = 1) -> Assigned:
    """Group ``clean`` (``_v``, ``_k``, ``label``, ``_g``, ``_s``) by vector, give each distinct row its split.

    Writes the vectors (one shuffle) under ``stage/vectors`` and the distinct rows with ``split``,
    a seeded shuffle key ``_order`` and a tie-break ``_tie`` under ``stage/assigned``.
    """
    member = F.struct(F.col("label"), F.col("_g"), F.col("_s"))
    vectors = clean.groupBy("_v", "_k").agg(F.array_sort(F.collect_set(member)).alias("members"))
    n = F.size("members")
    labels = F.col("members.label")
    # A regression target has no classes to stratify by: its rows are one stratum.
    stratified = split.stratify and by_class and split.column is None
    stratum = F.array_min(labels) if stratified else F.lit(0).cast("long")
    key = _hash(split.seed, [F.col("_v"), F.col("_k")])
    vectors.select("_v", "_k", "members", n.alias("_n"), stratum.alias("_stratum"), key.alias("_key"),
                   (F.array_min(labels) != F.array_max(labels)).alias("_conflict")
                   ).write.option("compression", "lz4").parquet(str(stage / "vectors"))
    vectors = spark.read.parquet(str(stage / "vectors"))
    bits = _bucket_bits(classes if stratified else 1)  # a stratum is a class (the vector's smallest label)
    bucket = F.shiftright("_key", 64 - bits)
    counted = vectors.groupBy("_stratum", bucket.alias("_bucket")).agg(
        F.sum("_n").alias("rows"), F.sum(F.when(F.col("_n") > 1, F.col("_n"))).alias("shared"),
        F.sum(F.when(F.col("_conflict"), F.col("_n"))).alias("conflict")).collect()
    overlap = {"shared_features": sum(int(c["shared"] or 0) for c in counted),
               "conflicting_labels": sum(int(c["conflict"] or 0) for c in counted)}
    total = sum(int(c["rows"]) for c in counted)
    rows = vectors.select("*", F.explode("members").alias("m"))
    if split.column is not None:
        which = F.col("m._s")
    else:
        plan = spark.createDataFrame(_plan(counted, split), "_stratum LONG, _bucket LONG, _prefix LONG, "
                                     "_decided STRING, _train LONG, _val LONG")
        which = _which(vectors.withColumn("_bucket", bucket).join(F.broadcast(plan), ["_stratum", "_bucket"]))
        rows = which.select("*", F.explode("members").alias("m"))
        which = F.col("_split")
    content = [F.col("_v"), F.col("_k"), F.col("m.label"), F.col("m._g"), F.col("m._s")]
    rows.select("_v", "_k", F.col("m.label").alias("label"), F.col("m._g").alias("_g"),
                _hash(split.seed, [F.lit("shuffle"), *content]).alias("_order"),
                _hash(split.seed + 1, [F.lit("shuffle"), *content]).alias("_tie"),
                which.alias("split")).write.option("compression", "lz4").partitionBy("split").parquet(
                    str(stage / "assigned"))
    return Assigned(stage / "assigned", total, overlap)


def _which(vectors: DataFrame) -> DataFrame:
    """``vectors`` joined with their bucket's plan, with ``_split``: decided per bucket, or ranked exactly."""
    cut = F.col("_decided").isNull()
    # Rows of the stratum before this vector: the bucket's prefix plus the rows of earlier vectors in it.
    earlier = Window.partitionBy("_stratum", "_bucket").orderBy("_key", "_v", "_k").rowsBetween(
        Window.unboundedPreceding, -1)
    before = F.col("_prefix") + F.coalesce(F.sum("_n").over(earlier), F.lit(0))
    ranked = vectors.filter(cut).withColumn(
        "_split", F.when(before < F.col("_train"), "train").when(before < F.col("_train") + F.col("_val"), "val")
        .otherwise("test"))
    decided = vectors.filter(~cut).withColumn("_split", F.col("_decided"))
    return decided.unionByName(ranked)


def _plan(counted: list, split: SplitSpec) -> list[tuple]:
    """Per (stratum, bucket): rows before it in its stratum, and its split when all its rows share one."""
    by_stratum: dict[int, list] = {}
    for c in counted:
        by_stratum.setdefault(int(c["_stratum"]), []).append((int(c["_bucket"]), int(c["rows"])))
    plan = []
    for stratum, buckets in by_stratum.items():
        size = sum(r for _, r in buckets)
        n_train = math.floor(size * split.train + 0.5)  # half-up: every split within one row of its share
        n_val = math.floor(size * split.val + 0.5)
        prefix = 0
        for b, r in sorted(buckets):
            # A vector goes to train while fewer than n_train rows come before it, then to val.
            first, last = prefix, prefix + r - 1  # the smallest and largest "rows before" in the bucket
            decided = None
            if last < n_train:
                decided = "train"
            elif first >= n_train and last < n_train + n_val:
                decided = "val"
            elif first >= n_train + n_val:
                decided = "test"
            plan.append((stratum, b, prefix, decided, n_train, n_val))
            prefix += r
    return plan


def _bucket_bits(strata: int) -> int:
    return max(4, min(12, int(math.log2(max(1, MAX_BUCKET_ROWS // max(1, strata))))))


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


def _hash(seed: int, cols: list[Column]) -> Column:
    return F.xxhash64(F.lit(seed).cast("long"), *cols)
