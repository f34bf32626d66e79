"""Splits are deterministic by seed, independent of Spark's parallelism, and stratified."""

from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np
import pyarrow.parquet as pq

from orchard.data import prepare
from orchard.data.manifest import read_split
from tests.data.prep_helpers import row_set, write_csv

SPLITS = ("train", "val", "test")


def test_same_seed_gives_identical_splits_and_order_on_rerun_with_other_parallelism(
    spark, make_spec, tmp_path, digits_raw
):
    # Shuffle partitions are not part of the content hash: a fresh output folder forces a recompute.
    again = prepare(
        make_spec(normalize="none", output=str(tmp_path / "again"), spark={"shuffle_partitions": 7})
    )
    assert not again.reused
    assert again.path.name == digits_raw.path.name
    for split in SPLITS:
        for a, b in zip(read_split(digits_raw, split), read_split(again, split), strict=True):
            np.testing.assert_array_equal(a, b)


def test_different_seed_gives_different_splits(spark, make_spec, digits_raw):
    other = prepare(make_spec(normalize="none", split={"seed": 7}))
    assert other.path != digits_raw.path
    assert row_set(other, "train") != row_set(digits_raw, "train")
    # Same rows overall: only their assignment changed.
    assert set().union(*(row_set(other, s) for s in SPLITS)) == set().union(
        *(row_set(digits_raw, s) for s in SPLITS)
    )


def test_each_class_share_per_split_is_within_one_row_of_target(digits_raw):
    fractions = digits_raw.manifest["split"]
    labels = {s: read_split(digits_raw, s)[1] for s in SPLITS}
    per_class = Counter(np.concatenate(list(labels.values())).tolist())
    for split in SPLITS:
        got = Counter(labels[split].tolist())
        for cls, n in per_class.items():
            assert abs(got[cls] - n * fractions[split]) <= 1, (split, cls, got[cls], n)


def test_splits_are_disjoint_and_rows_are_shuffled(digits_raw):
    sets = [row_set(digits_raw, s) for s in SPLITS]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    _, train_labels = read_split(digits_raw, "train")
    # Not grouped by class: the label changes often between neighbouring rows.
    assert np.mean(train_labels[1:] != train_labels[:-1]) > 0.5


def test_unstratified_zero_val_split_is_empty_but_keeps_the_schema(spark, make_spec, digits_raw):
    prepared = prepare(
        make_spec(normalize="none", split={"train": 0.8, "val": 0.0, "test": 0.2, "stratify": False})
    )
    counts = prepared.manifest["counts"]
    assert counts["val"] == 0
    assert counts["train"] == round(0.8 * (counts["input"] - counts["duplicates"]))
    x, y = read_split(prepared, "val")
    assert x.shape == (0, 64) and y.shape == (0,)
    assert list(prepared.split_path("val").glob("part-*.parquet"))


def test_csv_row_numbers_and_splits_do_not_depend_on_file_partitioning(spark, make_spec, tmp_path):
    rows = [[i % 7, (i * 3) % 11, i % 13, i % 3] for i in range(2000)]
    rows[1500][0] = "bad"
    path = write_csv(tmp_path / "numbers.csv", ["a", "b", "c", "label"], rows)
    results = []
    for max_bytes in ("2k", "128m"):
        with _spark_conf(spark, "spark.sql.files.maxPartitionBytes", max_bytes):
            blocks = spark.read.text(str(path)).rdd.getNumPartitions()
            prepared = prepare(
                make_spec(source=str(path), normalize="none", output=str(tmp_path / max_bytes))
            )
        quarantine = pq.read_table(prepared.path / "quarantine").to_pylist()
        results.append((blocks, [q["row"] for q in quarantine], [read_split(prepared, s) for s in SPLITS]))
    (many, rows_a, splits_a), (one, rows_b, splits_b) = results
    assert many > 1 and one == 1
    assert rows_a == rows_b == [1501]
    for a, b in zip(splits_a, splits_b, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


@contextlib.contextmanager
def _spark_conf(spark, key: str, value: str):
    previous = spark.conf.get(key)
    spark.conf.set(key, value)
    try:
        yield
    finally:
        spark.conf.set(key, previous)
