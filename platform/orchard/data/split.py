"""Deduplicate, then split deterministically: a row's split depends only on its content and the seed.

Each row gets ``xxhash64(seed, features, label)``; within a class (or over all rows when not
stratified) rows are ranked by that hash and the first round(n * train) go to train, the next
round(n * val) to val, the rest to test. No step depends on partitioning or arrival order, so the
same input and seed give the same splits on any number of cores.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from orchard.config import SplitSpec
from orchard.data.clean import value_col
from orchard.data.manifest import GROUP_COL
from orchard.data.readers import category_col


def assign(clean: DataFrame, split: SplitSpec, n_features: int, by_class: bool = True,
           n_categorical: int = 0) -> DataFrame:
    """Distinct rows with ``split`` (train/val/test) and a seeded shuffle key ``_order``.

    ``_rank`` (the row's rank within its group) breaks ``_order`` ties, so (``_order``, ``label``,
    ``_rank``) orders rows totally.
    """
    keys = [value_col(i) for i in range(n_features)] + [category_col(j) for j in range(n_categorical)]
    # The same record at two sites is two clients' data, not a duplicate: the partition column is content.
    grouped = [GROUP_COL] if GROUP_COL in clean.columns else []
    content = [*(F.col(k) for k in keys), F.col("label"), *(F.col(g) for g in grouped)]
    distinct = clean.dropDuplicates([*keys, "label", *grouped])
    # A regression target has no classes to stratify by: its rows are one group.
    group = F.col("label") if split.stratify and by_class else F.lit(0)
    # The content after the hash breaks hash ties, so the order is total and never arrival order.
    ranked = Window.partitionBy(group).orderBy(_hash(split.seed, content), *content)
    rank = F.row_number().over(ranked) - 1
    size = F.count(F.lit(1)).over(Window.partitionBy(group))
    n_train, n_val = _rounded(size * split.train), _rounded(size * split.val)
    which = F.when(rank < n_train, "train").when(rank < n_train + n_val, "val").otherwise("test")
    order = _hash(split.seed, [F.lit("shuffle"), *content])
    return distinct.select(*content, which.alias("split"), order.alias("_order"), rank.alias("_rank"))


def _hash(seed: int, cols: list[Column]) -> Column:
    return F.xxhash64(F.lit(seed).cast("long"), *cols)


def _rounded(x: Column) -> Column:
    # Half-up rounding per class keeps every split within one row of its target share.
    return F.floor(x + F.lit(0.5))
