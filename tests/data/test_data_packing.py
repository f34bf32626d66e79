"""Feature vectors travel through Spark as float32 when the source's types hold float32s exactly: half
the bytes to stage and shuffle, the same rows and counts in the prep."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import functions as F

from orchard.data import prepare, readers
from orchard.data.prepare import plan
from tests.data.prep_helpers import row_set

SPLITS = ("train", "val", "test")


def _table(path, x: np.ndarray, y: np.ndarray, dtype) -> str:
    pq.write_table(pa.table({**{f"f{i}": x[:, i].astype(dtype) for i in range(x.shape[1])}, "label": y}), path)
    return str(path)


def _bytes_per_row(spark, make_spec, source: str) -> set[int]:
    found, _, _, group = plan(make_spec(source=source))
    parsed = readers.parse(readers.read(spark, found, group), found, False, group)
    return {r[0] for r in parsed.select(F.length("_v")).distinct().collect()}


def test_vectors_are_packed_float32_only_when_every_feature_type_holds_float32s_exactly(spark, make_spec, tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 100, (40, 5)), rng.integers(0, 2, 40)
    assert _bytes_per_row(spark, make_spec, _table(tmp_path / "u8.parquet", x, y, np.uint8)) == {4 * 5}
    assert _bytes_per_row(spark, make_spec, _table(tmp_path / "f32.parquet", x, y, np.float32)) == {4 * 5}
    assert _bytes_per_row(spark, make_spec, _table(tmp_path / "i32.parquet", x, y, np.int32)) == {8 * 5}
    assert _bytes_per_row(spark, make_spec, _table(tmp_path / "f64.parquet", x, y, np.float64)) == {8 * 5}
    # One folder, two files of different types: the whole source takes the wide packing.
    (tmp_path / "mixed").mkdir()
    _table(tmp_path / "mixed" / "a.parquet", x[:20], y[:20], np.int8)
    _table(tmp_path / "mixed" / "b.parquet", x[20:], y[20:], np.float64)
    assert _bytes_per_row(spark, make_spec, str(tmp_path / "mixed")) == {8 * 5}


def test_a_uint8_table_prepares_to_the_same_rows_and_counts_as_its_float64_copy(spark, make_spec, tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (600, 12)), rng.integers(0, 3, 600)
    x[500:520], y[500:520] = x[:20], y[:20]  # exact duplicates
    x[520:530], y[520:530] = x[20:30], (y[20:30] + 1) % 3  # the same features with another label
    narrow = prepare(make_spec(source=_table(tmp_path / "u8.parquet", x, y, np.uint8), normalize="none",
                               output=str(tmp_path / "narrow")))
    wide = prepare(make_spec(source=_table(tmp_path / "f64.parquet", x, y, np.float64), normalize="none",
                             output=str(tmp_path / "wide")))
    assert narrow.manifest["counts"] == wide.manifest["counts"]
    assert narrow.manifest["counts"]["duplicates"] == 20
    assert narrow.manifest["overlap"] == wide.manifest["overlap"]
    everything = [set().union(*(row_set(p, s) for s in SPLITS)) for p in (narrow, wide)]
    assert everything[0] == everything[1]
    assert len(everything[0]) == 580
