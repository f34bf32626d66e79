"""Read a source into one raw frame with a fixed shape, whatever the format, and parse it.

Columns of the raw frame:
    _row      1-based data row number (header excluded) — what a quarantine entry names
    _line     the CSV record as read (an image's path; null for other sources)
    _problem  why the record is broken before any field is parsed (an unreadable image), else null
    then, by source: nothing more (CSV: ``rowparse`` splits ``_line`` into fields), ``_fv`` (a feature
    vector: arrays, images, scikit-learn) or ``_f0.._fN`` (Parquet feature columns, any type), and
    ``_k0..`` (categorical), ``_y`` (label), ``_g`` (partition column), ``_s`` (the source's own split).

``parse`` turns it into one feature vector per row (see ``orchard.data.rowparse``): the plan holds the
same few nodes for 3 features or 3,000. Row numbers come from the file position of each record, not
from Spark's partitioning, so they are the same on any number of cores.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from orchard.data import rowparse
from orchard.data.source import Source, content_files, load_sklearn

# A line that ends inside a quoted field opened at a field start; a line that closes such a field and
# ends with well-formed fields. A record spanning lines starts with the first and ends with the second.
_OPENS = r'^(?:(?:"(?:[^"]|"")*"|[^",]*),)*"(?:[^"]|"")*$'
_CLOSES = r'^(?:[^"]|"")*"(?:,(?:"(?:[^"]|"")*"|[^",]*))*$'
MAX_RECORD_LINES = 1000  # a field left open longer than this is a stray quote, not a multi-line value
GROUP_RAW = "_g"
SPLIT_RAW = "_s"


def read(spark: SparkSession, source: Source, group: str | None = None) -> DataFrame:
    """The raw frame (nothing cached: every step that reads it again recomputes it from the source)."""
    if source.kind in ("sklearn", "images") and group is not None:  # refused earlier by groups.with_group
        raise RuntimeError(f"{source.kind} sources have no partition column {group!r}")
    if source.kind == "images":
        from orchard.data import images

        return images.read(spark, Path(source.location), list(source.image))
    if source.kind == "sklearn":
        return _read_sklearn(spark, source)
    if source.kind == "arrays":
        return _read_arrays(spark, source)
    if source.kind == "text":
        raise RuntimeError("text sources are read with read_text (they need the data section)")
    if source.kind == "csv":
        return _read_csv(spark, source, group)
    return _read_parquet(spark, source, group)


def parse(raw: DataFrame, source: Source, regression: bool, group: str | None) -> DataFrame:
    """The rows parsed in Arrow batches: ``rowparse.OUTPUT`` columns, ``_reason`` null for a clean row."""
    # Spark's workers may not have orchard installed: the parser travels by value (numpy/pyarrow only).
    from pyspark import cloudpickle

    cloudpickle.register_pickle_by_value(rowparse)
    split_column = source.split_column
    if source.kind == "csv":
        index = {name: i for i, name in enumerate(source.columns)}
        parser = rowparse.Parser("csv", source.features, source.label, source.categorical, regression, group,
                                 split_column, width=len(source.columns))
        parser = replace(parser, index=tuple(index[c] for c in parser.source_columns))
    else:
        mode = "vector" if "_fv" in raw.columns else "columns"
        pieces = "_path" in raw.columns
        parser = rowparse.Parser(mode, source.features, source.label, source.categorical, regression, group,
                                 split_column if pieces or "_s" in raw.columns else None,
                                 narrow=_narrow(raw, source))
    return raw.mapInArrow(parser, rowparse.OUTPUT)


def _narrow(raw: DataFrame, source: Source) -> bool:
    """Whether every feature value the source's types can hold is a float32 exactly (see ``rowparse``):
    decided from the types, so all of a source's rows are packed alike."""
    if source.kind == "images":  # 8 bits per channel, whatever the file
        return True
    if source.kind == "arrays":
        from orchard.data import arrays

        return _exact_in_float32(arrays.feature_dtype(arrays.parse(source.location)))
    if source.kind != "parquet" or not source.features:
        return False  # text (CSV) parses to float64; scikit-learn's arrays are float64
    if "_path" in raw.columns:  # local pieces: the files' own types (they may differ between files)
        import pyarrow.parquet as pq

        wanted = set(source.features)
        types = [f.type for path in content_files(Path(source.location))
                 for f in pq.read_schema(path) if f.name in wanted]
        return all(_exact_in_float32(t) for t in types)
    kinds = {f.name: f.dataType.typeName() for f in raw.schema.fields}
    return all(kinds[f"_f{i}"] in ("boolean", "byte", "short", "float") for i in range(len(source.features)))


def _exact_in_float32(t) -> bool:
    """For a numpy dtype or an Arrow type: booleans, integers of up to 16 bits, floats of up to 32."""
    import numpy as np

    try:
        dtype = np.dtype(t.to_pandas_dtype() if hasattr(t, "to_pandas_dtype") else t)
    except (TypeError, NotImplementedError):  # dictionaries, decimals, nested types: no
        return False
    return dtype.kind == "b" or dtype.itemsize <= {"i": 2, "u": 2, "f": 4}.get(dtype.kind, 0)


def category_col(j: int) -> str:
    """Categorical column j as read."""
    return f"_k{j}"


def quoted(name: str) -> Column:
    """A column by its exact name, even with dots or spaces in it."""
    return F.col("`" + name.replace("`", "``") + "`")


def read_text(spark: SparkSession, source: Source, data, group: str | None = None):
    """A text source's windows (see ``orchard.data.text``), built on the driver; (raw frame, samples)."""
    from orchard.data import text

    found = text.samples(text.read_archive(source.location), data)
    groups = found.users if group is not None else None
    return vector_frame(spark, found.x, found.y, found.splits, groups), found


def vector_frame(spark: SparkSession, x, y, splits=None, groups=None) -> DataFrame:
    """A raw frame from in-memory arrays (features (n, D), labels (n,)), handed to Spark through Arrow."""
    import numpy as np
    import pyarrow as pa

    n = len(x)
    columns = {"_row": pa.array(np.arange(1, n + 1, dtype=np.int64)), "_line": pa.nulls(n, pa.string()),
               "_problem": pa.nulls(n, pa.string()), "_fv": rowparse.pack(x),
               "_y": pa.array(y.astype(np.int64) if y.dtype.kind in "iub" else y)}
    if y.dtype.kind not in "iubf":
        columns["_y"] = pa.array(y.astype(str))
    if groups is not None:
        columns[GROUP_RAW] = pa.array(groups.astype(str))
    if splits is not None:
        columns[SPLIT_RAW] = pa.array(splits.astype(str))
    return spark.createDataFrame(pa.table(columns))


def _read_sklearn(spark: SparkSession, source: Source) -> DataFrame:
    bunch = load_sklearn(source.location)
    names = list(bunch.feature_names)
    x = bunch.data[:, [names.index(f) for f in source.features]]
    # Class ids stay integers; a regression target (diabetes) keeps its real values.
    y = bunch.target if bunch.target.dtype.kind == "f" else bunch.target.astype("int64")
    return vector_frame(spark, x, y)


def _read_arrays(spark: SparkSession, source: Source) -> DataFrame:
    """IDX/npy/npz loaded with numpy on the driver, handed to Spark through Arrow (data that fits memory)."""
    from orchard.data import arrays

    x, y, splits = arrays.load(arrays.parse(source.location))
    index = {name: i for i, name in enumerate(source.columns)}
    x = x.reshape(len(x), -1)
    picked = [index[f] for f in source.features]
    if picked != list(range(x.shape[1])):
        x = x[:, picked]
    return vector_frame(spark, x, y, splits if source.split_column is not None else None)


def _read_csv(spark: SparkSession, source: Source, group: str | None) -> DataFrame:
    lines = _numbered_text(spark, spark.read.text(source.location))
    # Line 0 is the header (when there is one); blank lines carry no row (like Spark's own CSV reader) but
    # keep numbering. Rows are numbered from 1 either way.
    first = 0 if source.header else -1
    lines = lines.filter((F.col("_line") > first) & (F.trim("value") != ""))
    if not source.header:
        lines = lines.withColumn("_line", F.col("_line") + 1)
    return lines.select(F.col("_line").alias("_row"), F.col("value").alias("_line"),
                        F.lit(None).cast("string").alias("_problem"))


def _records(spark: SparkSession, lines: DataFrame, marks: list[tuple[int, bool, bool]]) -> DataFrame:
    """(``_line``, ``value``) per CSV record: a quoted field holding newlines (RFC 4180) joins its lines.

    Only a line with an odd number of quotes can open or close such a field, so only those (``marks``:
    line, opens, closes) reach the driver; the record keeps the number of its first line. A quote that is
    never closed leaves its line a record of its own (quarantined for its quoting).
    """
    spans, open_at = [], None
    for line, opens, closes in sorted(marks):
        if open_at is not None and closes and line - open_at < MAX_RECORD_LINES:
            spans.append((open_at, line))
            open_at = None
        else:
            open_at = line if opens else None
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


def _read_parquet(spark: SparkSession, source: Source, group: str | None) -> DataFrame:
    pieces = None if source.remote else _parquet_pieces(Path(source.location), source, group)
    if pieces is not None:
        # Local files: each task reads its row groups with pyarrow inside the parse (``rowparse``), so the
        # values never pass through Spark's rows on the way in (for a wide table, most of the cost).
        return spark.sparkContext.parallelize(pieces, max(1, len(pieces))).toDF(
            "_path string, _rg int, _first long, _rows long, _skip long")
    frame = spark.read.parquet(source.location)
    # Each file's rows in file order (``row_index``), files in path order: the same on any number of cores.
    path, index = F.col("_metadata.file_path"), F.col("_metadata.row_index")
    counts = sorted(frame.groupBy(path.alias("f")).count().collect(), key=lambda r: r["f"])
    offsets, start = [], 0
    for c in counts:
        offsets += [F.lit(c["f"]), F.lit(start)]
        start += c["count"]
    first = F.create_map(*offsets)[path] if offsets else F.lit(0).cast("long")
    return frame.select(
        (first + index + 1).alias("_row"),
        F.lit(None).cast("string").alias("_line"),
        F.lit(None).cast("string").alias("_problem"),
        *[quoted(f).alias(f"_f{i}") for i, f in enumerate(source.features)],
        *[quoted(c).alias(category_col(j)) for j, c in enumerate(source.categorical)],
        quoted(source.label).alias("_y"),
        *([quoted(group).alias(GROUP_RAW)] if group else []),
        *([quoted(source.split_column).alias(SPLIT_RAW)] if source.split_column else []),
    )


def _parquet_pieces(location: Path, source: Source, group: str | None) -> list[tuple] | None:
    """(file, row group, rows of the source before the slice, rows, the slice's start in its row group) of a
    local Parquet source, files in
    path order, row groups split into slices when there are too few to keep every core busy; None when the
    files are not plain Parquet holding every column the prep reads (partitioned folders, mixed schemas):
    Spark's own reader takes those."""
    import pyarrow.parquet as pq

    files = content_files(location)  # the files Spark reads, and the content hash covers
    if not files or any(f.parent != (location if location.is_dir() else location.parent) for f in files):
        return None
    wanted = {*source.features, *source.categorical, source.label, *([group] if group else []),
              *([source.split_column] if source.split_column else [])}
    pieces, start = [], 0
    try:
        for f in files:
            meta = pq.ParquetFile(f).metadata
            if not wanted <= set(meta.schema.names):
                return None
            for g in range(meta.num_row_groups):
                pieces.append((str(f), g, start, meta.row_group(g).num_rows))
                start += meta.row_group(g).num_rows
    except (OSError, ValueError):  # not Parquet after all: Spark's reader names the problem
        return None
    # Fewer row groups than cores (one big file): each task reads a slice of a row group instead.
    cores = spark_cores()
    if len(pieces) < 2 * cores:
        rows = max(1, -(-start // (2 * cores)))
        return [(f, g, first + at, min(rows, n - at), at) for f, g, first, n in pieces for at in range(0, n, rows)]
    return [(f, g, first, n, 0) for f, g, first, n in pieces]


def spark_cores() -> int:
    from pyspark import SparkContext

    sc = SparkContext._active_spark_context
    return sc.defaultParallelism if sc is not None else 2


def _numbered_text(spark: SparkSession, text: DataFrame) -> DataFrame:
    """(``_line``, ``value``) per CSV record, ``_line`` the 0-based position of its first line in the source.

    Within one file split (block) lines arrive in file order and a partition reads its blocks one after
    another, so ``monotonically_increasing_id`` minus the block's smallest id is the position inside the
    block. One aggregate gives each block's size (their running sum in (file, offset) order gives each
    block's first line) and the few lines that may open or close a quoted field holding newlines. The
    ids are recomputed by every later job over the same scan (same files, same splits, so the same
    ids): nothing of the input is cached.
    """
    tagged = text.select(
        "value",
        F.col("_metadata.file_path").alias("_file"),
        F.col("_metadata.file_block_start").alias("_block"),
        F.monotonically_increasing_id().alias("_id"),
    )
    quotes = F.length("value") - F.length(F.regexp_replace("value", '"', ""))
    mark = F.when(quotes % 2 == 1, F.struct("_id", F.col("value").rlike(_OPENS).alias("opens"),
                                            F.col("value").rlike(_CLOSES).alias("closes")))
    blocks = tagged.groupBy("_file", "_block").agg(
        F.count(F.lit(1)).alias("n"), F.min("_id").alias("first"), F.collect_list(mark).alias("marks"))
    offsets, start, marks = [], 0, []
    for b in sorted(blocks.collect(), key=lambda b: (b["_file"], b["_block"])):
        offsets += [F.lit(f"{b['_block']}@{b['_file']}"), F.lit(start - b["first"])]
        marks += [(m["_id"] + start - b["first"], m["opens"], m["closes"]) for m in b["marks"]]
        start += b["n"]
    if not offsets:  # an empty source: no rows to number
        return tagged.select(F.lit(0).cast("long").alias("_line"), "value").limit(0)
    shift = F.create_map(*offsets)[F.concat_ws("@", F.col("_block").cast("string"), "_file")]
    lines = tagged.select((shift + F.col("_id")).alias("_line"), "value")
    return _records(spark, lines, marks)
