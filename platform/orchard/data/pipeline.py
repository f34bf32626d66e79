"""The Spark steps of a prep, in order: read → parse → tally → split → fit stats → write → finish.

Spark jobs, in order (nothing of the input is cached; what later steps re-read is staged as Parquet
under ``tmp/_spark`` and dropped once used):
  1. number the source's rows (CSV: block sizes and multi-line marks; Parquet: rows per file)
  2. parse every row in Arrow batches and stage them, clean and quarantined apart (one pass over the input)
  3. tally labels and quarantine (two small aggregates over staged columns)
  4. group the clean rows by feature vector (one shuffle), count rows per (stratum, hash bucket),
     stage the distinct rows with their split
  5. fit the stats on the training split (one streaming aggregate), the vocabularies, the target stats
  6. write the splits in seeded order, scaled (one job); a streaming pyarrow pass fixes types, names and
     the number of files
"""

from __future__ import annotations

import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from orchard.config import DataSpec
from orchard.data import categories, clean, normalize, readers, rowparse, split, text
from orchard.data.manifest import SPLITS
from orchard.data.source import Source, task_of
from orchard.data.write import (
    QUARANTINE,
    SPARK_DIR,
    distinct_groups,
    finish_quarantine,
    finish_split,
    split_schema,
)

log = logging.getLogger("orchard.data")
PARSED = ("_row long, _reason string, _raw string, _v binary, _k array<string>, _lab string, "
          "_g string, _s string, _ok boolean")


def run(
    spark: SparkSession, source: Source, data: DataSpec, tmp: Path, *, shape, digest: str, group: str | None = None
) -> dict[str, Any]:
    """Write the splits (and quarantine) under ``tmp``; return the manifest.

    ``group`` names a source column carried into every split as ``group`` (see ``orchard.data.groups``).
    """
    d = len(source.features)
    regression = task_of(source, data) == "regression"
    stage = tmp / SPARK_DIR
    step = _Steps()
    found = None
    if source.kind == "text":
        raw, found = readers.read_text(spark, source, data, group)
    else:
        raw = readers.read(spark, source, group)
    step("number rows")
    # data.sample picks rows by a hash of their number, so sampling the parsed rows keeps the same ones.
    rows, sampled = _sampled(readers.parse(raw, source, regression, group), data)
    parsed = _stage_parsed(spark, rows, stage / "parsed")
    step("parse")
    good, bad = parsed.filter(F.col("_ok")), parsed.filter(~F.col("_ok"))
    tally = clean.tally(parsed, source, regression, data.task == "auto")
    if found is not None:
        tally = _token_classes(tally, found)
    log.info("%d rows read, %d quarantined, %d classes", tally.input, tally.quarantined, len(tally.classes))
    step("tally")
    split_spec = data.split
    if source.kind == "text" and split_spec.column is None:  # a text source splits each client in time order
        split_spec = split_spec.model_copy(update={"column": source.split_column})
    assigned = split.assign(spark, clean.indexed(good, tally, regression), split_spec, not regression, stage,
                            len(tally.classes))
    # What later steps no longer read leaves the disk now: at 50M rows each staged copy is gigabytes.
    shutil.rmtree(stage / "vectors", ignore_errors=True)
    shutil.rmtree(stage / "parsed" / "_ok=true", ignore_errors=True)
    step("dedupe and split")
    overlap = assigned.overlap
    if overlap["conflicting_labels"]:
        log.warning("%d rows share their features with a row of another label; each such group is "
                    "kept whole in one split", overlap["conflicting_labels"])
    train = assigned.split(spark, "train")
    stats = normalize.fit(train, data.normalize, d)
    target = _target_stats(train) if regression else None
    vocab = categories.fit(train, source.categorical)
    step("fit stats")
    scaler = rowparse.Scaler(data.normalize, d, _stat_pair(stats), tuple(tuple(v) for _, v in vocab), regression,
                             group is not None)
    width = d + len(vocab)
    sizes = _write_splits(spark, assigned, scaler, data.files_per_split, stage, tmp, width)
    step("write splits")
    if tally.quarantined:
        _write_quarantine(bad, tmp, tally.quarantined, stage)
    distinct = assigned.rows
    counts = {
        "input": tally.input,
        "quarantined": tally.quarantined,
        "duplicates": tally.input - tally.quarantined - distinct,
        **sizes,
    }
    if sum(sizes.values()) != distinct:  # a lost row is a bug here, never something to ship
        raise RuntimeError(f"prep lost rows: {distinct} distinct rows but splits hold {sizes}")
    manifest = _manifest(spark, source, data, tally, stats, counts, shape, digest)
    manifest["split"] = split_spec.model_dump(mode="json")
    # Distinct rows whose feature vector another row also has (with another label or partition value);
    # split.assign keeps each such vector in one split, so they are counted in the splits, not dropped.
    manifest["overlap"] = overlap
    if sampled is not None:
        manifest["sample"] = sampled
    if target is not None:
        manifest["target_stats"] = target
    if vocab:
        manifest["features"] = [*source.features, *source.categorical]
        manifest["feature_dim"] = width
        manifest["categorical"] = categories.describe(vocab, d)
    if found is not None:
        manifest["vocabulary"] = text.describe_vocabulary(found.vocabulary)
        manifest["text"] = {"seq_len": data.seq_len, "stride": data.text.stride, "clients": found.clients,
                            "dropped_clients": found.dropped, "min_samples": data.text.min_samples,
                            "user_column": text.USER_COLUMN}
    if group is not None:
        manifest["partition_column"] = {"source": group, "column": "group",
                                        "distinct": {s: distinct_groups(tmp / s) for s in SPLITS}}
    schema = split_schema(manifest["feature_dim"], regression, group is not None)
    manifest["schema"] = {f.name: str(f.type) for f in schema}
    return manifest


class _Steps:
    """Logs how long each step took (the engine log says where a slow prep spends its time)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        log.info("prep step %s: %.1f s", name, now - self.last)
        self.last = now


def _stage_parsed(spark: SparkSession, parsed: DataFrame, path: Path) -> DataFrame:
    """Write the parsed rows once (clean and quarantined in their own folders); later steps read this."""
    # lz4: staging is read back once or twice and deleted; it favours speed over size.
    (parsed.withColumn("_ok", F.col("_reason").isNull()).write.option("compression", "lz4")
     .partitionBy("_ok").parquet(str(path)))
    return spark.read.schema(PARSED).parquet(str(path))


def _sampled(raw: DataFrame, data: DataSpec) -> tuple[DataFrame, dict | None]:
    """``raw`` (rows with ``_row``) after ``data.sample``, and what the manifest records of it."""
    if data.sample is None:
        return raw, None
    before = raw.count()
    kept = split.sample(raw, data.sample, data.split.seed)
    return kept, {"sample": data.sample, "seed": data.split.seed, "source_rows": before}


def _token_classes(tally: clean.Tally, found) -> clean.Tally:
    """Next-token classes are the whole vocabulary, so a label (class index) is its character id."""
    size = len(found.vocabulary) + 1
    index = {key: int(tally.classes[i]) for key, i in tally.index.items()}
    return clean.Tally(tally.input, tally.quarantined, list(range(size)), index)


def _target_stats(train: DataFrame) -> dict[str, float]:
    """Mean and std of a regression target on the training split: models predict in these units."""
    row = train.agg(F.avg("label").alias("mean"), F.stddev_pop("label").alias("std")).first()
    return {"mean": float(row["mean"]), "std": float(row["std"]) or 1.0}


def _stat_pair(stats: dict[str, list[float]]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if not stats:
        return (), ()
    first, second = ("mean", "std") if "mean" in stats else ("min", "max")
    return tuple(stats[first]), tuple(stats[second])


def _write_splits(spark: SparkSession, assigned: split.Assigned, scaler: rowparse.Scaler, files: int,
                  stage: Path, tmp: Path, width: int) -> dict[str, int]:
    """All splits in one Spark job, each in its seeded shuffle order; rows per split."""
    staged = stage / "splits"
    if any((assigned.path / f"split={s}").is_dir() for s in SPLITS):
        # Range partitions of (split, shuffle key), each sorted: a split's files read in name (task) order
        # give its seeded order whatever Spark's partitioning. Category indices ride at the end of the float
        # vector (exact below 2**24), so every consumer keeps one tensor column.
        out = "features binary, label " + ("double" if scaler.regression else "bigint")
        out += ", group string" if scaler.grouped else ""
        rows = spark.read.parquet(str(assigned.path))
        keys = ["split", "_order", "_tie"]
        (rows.repartitionByRange(files * len(SPLITS), *keys).sortWithinPartitions(*keys)
         .mapInArrow(scaler, out + ", split string").write.partitionBy("split").parquet(str(staged)))
    return {s: finish_split(staged / f"split={s}", tmp / s, width, files, scaler.regression, scaler.grouped)
            for s in SPLITS}


def _write_quarantine(bad: DataFrame, tmp: Path, expected: int, stage: Path) -> None:
    staged = stage / QUARANTINE
    columns = [F.col("_row").alias("row"), F.col("_reason").alias("reason"), F.col("_raw").alias("raw")]
    # Quarantine is expected to be small: one task, one file.
    bad.select(*columns).coalesce(1).write.parquet(str(staged))
    written = finish_quarantine(staged, tmp / QUARANTINE)
    if written != expected:
        raise RuntimeError(f"quarantine holds {written} rows, {expected} were counted")


def _manifest(spark, source: Source, data: DataSpec, tally, stats, counts, shape, digest) -> dict[str, Any]:
    task = task_of(source, data)
    return {
        "version": 1,
        "source": source.describe(),
        "dataset": source.slug,
        "content_hash": digest,
        "label_column": source.label,
        "features": list(source.features),
        "feature_dim": len(source.features),
        "image_shape": shape,
        "classes": tally.classes,
        "num_classes": len(tally.classes),
        "task": task,
        "normalize": data.normalize,
        "stats": stats,
        "counts": counts,
        "splits": {s: s for s in SPLITS},
        "quarantine_path": QUARANTINE if counts["quarantined"] else None,
        "split": data.split.model_dump(mode="json"),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "spark_version": spark.version,
    }
