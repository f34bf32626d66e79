"""The contract's one reader: rows in file order, float32 features, labels typed by task, no `.values` slips."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchard.data.manifest import (
    feature_matrix,
    label_dtype,
    numbers,
    prepared_folder,
    read_features,
    read_groups,
    read_head,
    read_labels,
    read_split,
    slug,
    split_files,
)
from orchard.data.synthetic import write_prepared

DIM = 3


def _rows(n: int) -> np.ndarray:
    """Row i is (i, i + 0.25, i + 0.5): any misplaced row shows."""
    return (np.arange(n, dtype=np.float32)[:, None] + np.array([0, 0.25, 0.5], np.float32)).astype(np.float32)


def _column(n: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(_rows(n).reshape(-1)), DIM)


def test_a_sliced_column_is_read_from_its_offset_where_values_is_not():
    sliced = _column(10).slice(4, 3)
    # The pitfall itself: .values is the whole child array, from row 0.
    assert len(sliced.values) == 30 and sliced.values[0].as_py() == 0.0
    np.testing.assert_array_equal(feature_matrix(sliced), _rows(10)[4:7])


def test_a_chunked_column_of_sliced_chunks_keeps_every_chunks_rows():
    column = pa.chunked_array([_column(10).slice(2, 3), _column(10).slice(7, 2)])
    np.testing.assert_array_equal(feature_matrix(column), _rows(10)[[2, 3, 4, 7, 8]])
    table = pa.table({"features": _column(10)}).slice(6, 3)  # a table slice: a chunk with an offset
    np.testing.assert_array_equal(feature_matrix(table.column("features")), _rows(10)[6:9])


def test_feature_matrix_copies_unless_asked_for_a_view():
    column = _column(4)
    copied = feature_matrix(column)
    assert copied.dtype == np.float32 and copied.shape == (4, DIM) and copied.flags.writeable
    view = feature_matrix(column, copy=False)
    assert not view.flags.writeable  # Arrow's own buffer, not a copy
    np.testing.assert_array_equal(view, copied)
    assert feature_matrix(pa.chunked_array([], pa.list_(pa.float32(), DIM))).shape == (0, DIM)


@pytest.fixture
def grouped(tmp_path):
    """40 rows: train 0..29 in 3 files, val none, test 30..39; labels i % 4; site per row."""
    x, y = _rows(40), np.arange(40) % 4
    groups = np.array([f"site-{i % 3}" for i in range(40)])
    splits = {"train": np.arange(30), "test": np.arange(30, 40)}
    return write_prepared(tmp_path / "p", x, y, splits, groups=groups, partition_by="site", files=3), x, y, groups


def test_a_split_reads_back_in_file_order_with_int64_labels(grouped):
    prepared, x, y, groups = grouped
    assert [f.name for f in split_files(prepared, "train")] == [f"part-0000{i}.parquet" for i in range(3)]
    xs, ys = read_split(prepared, "train")
    assert xs.dtype == np.float32 and xs.shape == (30, DIM) and ys.dtype == np.int64
    np.testing.assert_array_equal(xs, x[:30])
    np.testing.assert_array_equal(ys, y[:30])
    np.testing.assert_array_equal(read_features(prepared, "test"), x[30:])
    np.testing.assert_array_equal(read_labels(prepared, "test"), y[30:])
    assert read_groups(prepared, "train").tolist() == groups[:30].tolist()


def test_an_empty_split_reads_as_zero_rows_of_the_right_shape(grouped):
    prepared = grouped[0]
    xs, ys = read_split(prepared, "val")
    assert xs.shape == (0, DIM) and ys.shape == (0,) and ys.dtype == np.int64
    assert read_head(prepared, "val", 4).shape == (0, DIM)


def test_read_head_takes_the_first_rows_across_file_edges(grouped):
    prepared, x, _, _ = grouped
    assert len(pq.read_metadata(split_files(prepared, "train")[0]).to_dict()["row_groups"]) == 1
    first = read_head(prepared, "train", 12)  # train files hold 10 rows each: 12 rows span two
    assert first.shape == (12, DIM) and first.dtype == np.float32
    np.testing.assert_array_equal(first, x[:12])
    np.testing.assert_array_equal(read_head(prepared, "test", 100), x[30:])


def test_groups_are_none_without_a_partition_column(tmp_path):
    prepared = write_prepared(tmp_path / "p", _rows(6), np.arange(6) % 2, {"train": slice(0, 6)})
    assert read_groups(prepared, "train") is None


def test_a_regression_target_reads_as_float32(tmp_path):
    y = np.linspace(-1, 1, 8)
    prepared = write_prepared(tmp_path / "p", _rows(8), y, {"train": slice(0, 6), "test": slice(6, 8)})
    assert label_dtype(prepared.manifest) is np.float32
    assert label_dtype({"task": "classification"}) is np.int64
    _, ys = read_split(prepared, "train")
    assert ys.dtype == np.float32
    np.testing.assert_allclose(ys, y[:6].astype(np.float32))


def test_slug_and_prepared_folder_name_the_prepared_data(tmp_path):
    assert slug("sklearn:Breast Cancer") == "sklearn-breast-cancer"
    assert slug("--", "column") == "column" and slug("--") == "data"
    assert prepared_folder(tmp_path, "digits", "abc123") == tmp_path / "digits-abc123"


@pytest.mark.parametrize("array", [
    pa.array(np.arange(10, dtype=np.int64)).slice(3, 4),
    pa.array(np.arange(10, dtype=np.uint8)).slice(7),
    pa.array(np.linspace(0, 1, 9)).slice(2, 5),
    pa.array(np.arange(6, dtype=np.float32)),
    pa.chunked_array([pa.array([1, 2], pa.int32()), pa.array([3], pa.int32()).slice(0, 1), pa.array([], pa.int32())]),
    pa.chunked_array([], pa.int64()),
    pa.array([1.5, None, 2.5]),
    pa.array([True, False, True]),
])
def test_numbers_read_a_column_as_arrow_converts_it(array):
    got, want = numbers(array), array.to_numpy(zero_copy_only=False)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_reading_a_split_does_not_load_pandas(tmp_path):
    """A Flower client or the ServerApp reads splits; pandas (0.5 s, 65 MiB a process) must stay out."""
    import subprocess
    import sys

    prepared = write_prepared(tmp_path / "p", _rows(50), np.arange(50) % 3, {"train": slice(0, 50)}, files=3)
    code = ("import sys; from orchard.data.manifest import load_manifest, read_split; "
            f"x, y = read_split(load_manifest({str(prepared.path)!r}), 'train'); "
            "print(x.shape, int(y.sum()), 'pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["(50,", "3)", str(int((np.arange(50) % 3).sum())), "False"]
