"""Read a source into one raw frame with a fixed shape, whatever the format.

Columns of the raw frame:
    _row      1-based data row number (header excluded) — what a quarantine entry names
    _raw      the row as read (the CSV line; JSON of the values for Parquet), for quarantine
    _problem  why the row's structure is broken (wrong field count, bad quoting), else null
    _f0.._fN  the feature values as read (strings for CSV), in ``source.features`` order
    _y        the label as read
    _g        the partition column as read (only when one is asked for: see ``orchard.data.groups``)
    _s        the source's own split (only with ``data.split.column``: see ``orchard.data.split``)

Row numbers come from the file position of each record, not from Spark's partitioning, so they are
the same on any number of cores.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from orchard.data.source import Source, load_sklearn

# A quoted CSV field with "" as the escaped quote (RFC 4180); removed before counting separators.
_QUOTED_FIELD = r'"(?:[^"]|"")*"'
# A line that ends inside a quoted field opened at a field start; a line that closes such a field and
# ends with well-formed fields. A record spanning lines starts with the first and ends with the second.
_OPENS = r'^(?:(?:"(?:[^"]|"")*"|[^",]*),)*"(?:[^"]|"")*$'
_CLOSES = r'^(?:[^"]|"")*"(?:,(?:"(?:[^"]|"")*"|[^",]*))*$'
MAX_RECORD_LINES = 1000  # a field left open longer than this is a stray quote, not a multi-line value
GROUP_RAW = "_g"
SPLIT_RAW = "_s"


def read(spark: SparkSession, source: Source, hold: list[DataFrame], group: str | None = None) -> DataFrame:
    """The raw frame. Frames cached on the way are appended to ``hold``: unpersist them when done."""
    if source.kind in ("sklearn", "images"):
        if group is not None:  # refused earlier by groups.with_group; a bug if reached
            raise RuntimeError(f"{source.kind} sources have no partition column {group!r}")
        if source.kind == "images":
            from orchard.data import images

            # Cached: every later step would otherwise decode the images again.
            frame = images.read(spark, Path(source.location), list(source.image), len(source.features)).cache()
            hold.append(frame)
            return frame
        return _read_sklearn(spark, source)
    if source.kind == "arrays":
        return _read_arrays(spark, source, group)
    if source.kind == "csv":
        return _read_csv(spark, source, hold, group)
    return _read_parquet(spark, source, hold, group)


def feature_col(i: int) -> str:
    return f"_f{i}"


def category_col(j: int) -> str:
    """Categorical column j as read (a string)."""
    return f"_k{j}"


def quoted(name: str) -> Column:
    """A column by its exact name, even with dots or spaces in it."""
    return F.col("`" + name.replace("`", "``") + "`")


def _read_sklearn(spark: SparkSession, source: Source) -> DataFrame:
    bunch = load_sklearn(source.location)
    names = list(bunch.feature_names)
    frame = pd.DataFrame(
        {feature_col(i): bunch.data[:, names.index(f)] for i, f in enumerate(source.features)}
    )
    frame.insert(0, "_row", range(1, len(frame) + 1))
    # Class ids stay integers; a regression target (diabetes) keeps its real values.
    frame["_y"] = bunch.target if bunch.target.dtype.kind == "f" else bunch.target.astype("int64")
    none = F.lit(None).cast("string")
    features = [feature_col(i) for i in range(len(source.features))]
    return spark.createDataFrame(frame).select(
        "_row", none.alias("_raw"), none.alias("_problem"), *features, "_y"
    )


def _read_arrays(spark: SparkSession, source: Source, group: str | None) -> DataFrame:
    """IDX/npy/npz loaded with numpy on the driver, handed to Spark through Arrow (data that fits memory)."""
    import numpy as np
    import pyarrow as pa

    from orchard.data import arrays

    x, y, splits = arrays.load(arrays.parse(source.location))
    index = {name: i for i, name in enumerate(source.columns)}
    n = len(x)
    columns = {"_row": pa.array(np.arange(1, n + 1, dtype=np.int64)), "_raw": pa.nulls(n, pa.string()),
               "_problem": pa.nulls(n, pa.string())}
    for i, f in enumerate(source.features):
        columns[feature_col(i)] = pa.array(np.ascontiguousarray(x[:, index[f]], dtype=np.float64))
    columns["_y"] = pa.array(y.astype(np.int64) if y.dtype.kind in "iub" else y.astype(str))
    table = pa.table(columns)
    if source.split_column is not None and splits is not None:
        table = table.append_column(SPLIT_RAW, pa.array(splits.astype(str)))
    del x
    return spark.createDataFrame(table)


def _read_csv(spark: SparkSession, source: Source, hold: list[DataFrame], group: str | None) -> DataFrame:
    lines = _records(spark, _numbered(spark.read.text(source.location), hold))
    # Line 0 is the header (when there is one); blank lines carry no row (like Spark's own CSV reader) but
    # keep numbering. Rows are numbered from 1 either way.
    first = 0 if source.header else -1
    lines = lines.filter((F.col("_line") > first) & (F.trim("value") != ""))
    if not source.header:
        lines = lines.withColumn("_line", F.col("_line") + 1)
    width = len(source.columns)
    schema = ", ".join(f"_c{i} STRING" for i in range(width)) + ", _corrupt_record STRING"
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": "_corrupt_record", "escape": '"'}
    parsed = F.from_csv("value", schema, options)
    index = {name: i for i, name in enumerate(source.columns)}
    return lines.select(
        F.col("_line").alias("_row"),
        F.col("value").alias("_raw"),
        _csv_problem(F.col("value"), width, parsed["_corrupt_record"]).alias("_problem"),
        *[parsed[f"_c{index[f]}"].alias(feature_col(i)) for i, f in enumerate(source.features)],
        *[parsed[f"_c{index[c]}"].alias(category_col(j)) for j, c in enumerate(source.categorical)],
        parsed[f"_c{index[source.label]}"].alias("_y"),
        *([parsed[f"_c{index[group]}"].alias(GROUP_RAW)] if group else []),
        *([parsed[f"_c{index[source.split_column]}"].alias(SPLIT_RAW)] if source.split_column else []),
    )


def _records(spark: SparkSession, lines: DataFrame) -> DataFrame:
    """(``_line``, ``value``) per CSV record: a quoted field holding newlines (RFC 4180) joins its lines.

    Only a line with an odd number of quotes can open or close such a field, so only those reach the
    driver (as line numbers); the record keeps the number of its first line. A quote that is never
    closed leaves its line a record of its own (quarantined for its quoting).
    """
    quotes = F.length("value") - F.length(F.regexp_replace("value", '"', ""))
    marks = lines.filter(quotes % 2 == 1).select(
        "_line", F.col("value").rlike(_OPENS).alias("opens"), F.col("value").rlike(_CLOSES).alias("closes")
    ).collect()
    spans, open_at = [], None
    for m in sorted(marks, key=lambda m: m["_line"]):
        if open_at is not None and m["closes"] and m["_line"] - open_at < MAX_RECORD_LINES:
            spans.append((open_at, m["_line"]))
            open_at = None
        else:
            open_at = m["_line"] if m["opens"] else None
    if not spans:
        return lines.select("_line", "value")
    owner = spark.createDataFrame(spans, "_start LONG, _end LONG").select(
        "_start", F.explode(F.sequence("_start", "_end")).alias("_line"))
    tagged = lines.join(F.broadcast(owner), "_line", "left")
    joined = (
        tagged.filter(F.col("_start").isNotNull())
        .groupBy(F.col("_start").alias("_line"))
        .agg(F.sort_array(F.collect_list(F.struct("_line", "value"))).alias("_parts"))
        .select("_line", F.concat_ws("\n", F.col("_parts.value")).alias("value"))
    )
    return tagged.filter(F.col("_start").isNull()).select("_line", "value").unionByName(joined)


def _csv_problem(line: Column, width: int, corrupt: Column) -> Column:
    # Spark's CSV parser pads short rows with nulls and drops extra tokens without flagging either,
    # so the separators outside quoted fields are counted here.
    unquoted = F.regexp_replace(line, _QUOTED_FIELD, "")
    fields = F.size(F.split(unquoted, ",", -1))
    return (
        F.when(unquoted.contains('"'), F.lit("malformed quoting"))
        .when(fields != width, F.concat(F.lit(f"expected {width} fields, got "), fields.cast("string")))
        .when(corrupt.isNotNull(), F.lit("malformed CSV record"))
    )


def _read_parquet(spark: SparkSession, source: Source, hold: list[DataFrame], group: str | None) -> DataFrame:
    records = _numbered(spark.read.parquet(source.location), hold)
    carried = [c for c in (group, source.split_column) if c]
    kept = [*source.features, *source.categorical, source.label, *carried]
    return records.select(
        (F.col("_line") + 1).alias("_row"),
        F.to_json(F.struct(*[quoted(c) for c in kept])).alias("_raw"),
        F.lit(None).cast("string").alias("_problem"),
        *[quoted(f).alias(feature_col(i)) for i, f in enumerate(source.features)],
        *[quoted(c).cast("string").alias(category_col(j)) for j, c in enumerate(source.categorical)],
        quoted(source.label).alias("_y"),
        *([quoted(group).cast("string").alias(GROUP_RAW)] if group else []),
        *([quoted(source.split_column).cast("string").alias(SPLIT_RAW)] if source.split_column else []),
    )


def _numbered(df: DataFrame, hold: list[DataFrame]) -> DataFrame:
    """Add ``_line``: the 0-based position of each record in the source, ordered by (file, offset).

    Within one file split (block) records arrive in file order and a partition reads its blocks
    one after another, so ``monotonically_increasing_id`` minus the block's smallest id is the
    position inside the block. One small aggregate gives each block's size; their running sum in
    (file, offset) order gives each block's first line.
    """
    tagged = df.select(
        "*",
        F.col("_metadata.file_path").alias("_file"),
        F.col("_metadata.file_block_start").alias("_block"),
        F.monotonically_increasing_id().alias("_id"),
    ).cache()  # the ids must not be recomputed on a different plan; the cache also saves a re-read
    hold.append(tagged)
    blocks = tagged.groupBy("_file", "_block").agg(F.count(F.lit(1)).alias("n"), F.min("_id").alias("first"))
    offsets, start = [], 0
    for b in sorted(blocks.collect(), key=lambda b: (b["_file"], b["_block"])):
        offsets += [F.lit(f"{b['_block']}@{b['_file']}"), F.lit(start - b["first"])]
        start += b["n"]
    if not offsets:  # an empty source: no rows to number
        return tagged.withColumn("_line", F.lit(0).cast("long"))
    shift = F.create_map(*offsets)[F.concat_ws("@", F.col("_block").cast("string"), "_file")]
    return tagged.withColumn("_line", shift + F.col("_id"))
