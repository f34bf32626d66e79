"""The Spark steps of a prep, in order: read → clean → split → fit stats → write → finish.

Spark jobs, in order: number the source's rows (CSV/Parquet), count rows and labels, count the
distinct rows and those sharing a feature vector (caching them), fit stats on train, write the splits, write the quarantine.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from orchard.config import DataSpec
from orchard.data import categories, clean, normalize, readers, split
from orchard.data.manifest import FEATURES_COL, GROUP_COL, LABEL_COL, SPLITS
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


def run(
    spark: SparkSession, source: Source, data: DataSpec, tmp: Path, *, shape, digest: str, group: str | None = None
) -> dict[str, Any]:
    """Write the splits (and quarantine) under ``tmp``; return the manifest.

    ``group`` names a source column carried into every split as ``group`` (see ``orchard.data.groups``).
    """
    d = len(source.features)
    regression = task_of(source, data) == "regression"
    hold: list[DataFrame] = []
    try:
        raw, sampled = _sampled(readers.read(spark, source, hold, group), data, hold)
        if source.split_column is not None:
            raw = split.predefined_problem(raw, source.split_column)
        parsed = clean.parse(raw, source, regression, group)
        tally = clean.tally_regression(parsed) if regression else clean.tally(parsed, source, data.task == "auto")
        log.info(
            "%d rows read, %d quarantined, %d classes", tally.input, tally.quarantined, len(tally.classes)
        )
        c = len(source.categorical)
        rows = split.assign(clean.indexed(parsed, tally, d, regression, c), data.split, d, not regression, c).cache()
        hold.append(rows)
        overlap = split.shared(rows)
        distinct = overlap.pop("rows")
        if overlap["conflicting_labels"]:
            log.warning("%d rows share their features with a row of another label; each such group is "
                        "kept whole in one split", overlap["conflicting_labels"])
        train = rows.filter(F.col("split") == "train")
        stats = normalize.fit(train, data.normalize, d)
        target = _target_stats(train) if regression else None
        vocab = categories.fit(train, source.categorical)
        sizes = _write_splits(rows, data, stats, tmp, d, regression, categories.encode(vocab), group is not None)
        if tally.quarantined:
            _write_quarantine(parsed, tmp, tally.quarantined)
    finally:
        for frame in hold:
            frame.unpersist()
    counts = {
        "input": tally.input,
        "quarantined": tally.quarantined,
        "duplicates": tally.input - tally.quarantined - distinct,
        **sizes,
    }
    if sum(sizes.values()) != distinct:  # a lost row is a bug here, never something to ship
        raise RuntimeError(f"prep lost rows: {distinct} distinct rows but splits hold {sizes}")
    manifest = _manifest(spark, source, data, tally, stats, counts, shape, digest)
    # Distinct rows whose feature vector another row also has (with another label or partition value);
    # split.assign keeps each such vector in one split, so they are counted in the splits, not dropped.
    manifest["overlap"] = overlap
    if sampled is not None:
        manifest["sample"] = sampled
    if target is not None:
        manifest["target_stats"] = target
    if vocab:
        manifest["features"] = [*source.features, *source.categorical]
        manifest["feature_dim"] = d + len(vocab)
        manifest["categorical"] = categories.describe(vocab, d)
    if group is not None:
        manifest["partition_column"] = {"source": group, "column": GROUP_COL,
                                        "distinct": {s: distinct_groups(tmp / s) for s in SPLITS}}
    schema = split_schema(manifest["feature_dim"], regression, group is not None)
    manifest["schema"] = {f.name: str(f.type) for f in schema}
    return manifest


def _sampled(raw: DataFrame, data: DataSpec, hold: list[DataFrame]) -> tuple[DataFrame, dict | None]:
    """``raw`` after ``data.sample`` (cached: counted and read again), and what the manifest records of it."""
    if data.sample is None:
        return raw, None
    before = raw.count()
    kept = split.sample(raw, data.sample, data.split.seed).cache()
    hold.append(kept)
    return kept, {"sample": data.sample, "seed": data.split.seed, "source_rows": before}


def _target_stats(train: DataFrame) -> dict[str, float]:
    """Mean and std of a regression target on the training split: models predict in these units."""
    row = train.agg(F.avg("label").alias("mean"), F.stddev_pop("label").alias("std")).first()
    return {"mean": float(row["mean"]), "std": float(row["std"]) or 1.0}


def _write_splits(rows: DataFrame, data: DataSpec, stats: dict, tmp: Path, d: int, regression: bool,
                  codes: list, grouped: bool = False) -> dict[str, int]:
    # Category indices ride at the end of the float feature vector (exact below 2**24), so every
    # consumer keeps one tensor column; the model splits them off for its embeddings.
    features = F.array(*normalize.apply(data.normalize, stats, d), *codes).alias(FEATURES_COL)
    d += len(codes)
    staged = tmp / SPARK_DIR / "splits"
    # One Spark job for all three splits; the pyarrow pass then fixes types, order and file count.
    carried = [GROUP_COL] if grouped else []
    rows.select(features, LABEL_COL, *carried, "split", "_order", "_rank").write.partitionBy("split").parquet(
        str(staged)
    )
    return {s: finish_split(staged / f"split={s}", tmp / s, d, data.files_per_split, regression, grouped)
            for s in SPLITS}


def _write_quarantine(parsed: DataFrame, tmp: Path, expected: int) -> None:
    staged = tmp / SPARK_DIR / QUARANTINE
    bad = parsed.filter(F.col("_reason").isNotNull())
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
