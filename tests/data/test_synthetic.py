"""The synthetic writer: a folder in the prep's layout that the contract's reader reads back unchanged."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchard.data.manifest import GROUP_COL, load_manifest, read_groups, read_split, split_files
from orchard.data.synthetic import write_prepared
from orchard.data.write import split_schema

PREP_KEYS = {
    "version", "source", "dataset", "content_hash", "label_column", "features", "feature_dim", "image_shape",
    "classes", "num_classes", "task", "normalize", "stats", "counts", "splits", "quarantine_path", "schema",
    "split", "created_at", "spark_version", "files",
}  # fmt: skip  (test_data_layout.py's MANIFEST_KEYS: what a real prep writes)


def _data(n: int = 50, dim: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, 3, n)


def test_the_written_folder_reads_back_equal_and_loads_as_a_manifest(tmp_path):
    x, y = _data()
    order = np.random.default_rng(1).permutation(50)
    splits = {"train": order[:30], "val": order[30:40], "test": order[40:]}
    written = write_prepared(tmp_path / "p", x, y, splits, files=4, dataset="toy")
    prepared = load_manifest(tmp_path / "p")
    m = prepared.manifest
    assert m == written.manifest and PREP_KEYS <= set(m)
    assert m["dataset"] == "toy" and m["task"] == "classification" and m["classes"] == [0, 1, 2]
    assert m["counts"] == {"input": 50, "quarantined": 0, "duplicates": 0, "train": 30, "val": 10, "test": 10}
    for split, rows in splits.items():
        xs, ys = read_split(prepared, split)
        np.testing.assert_array_equal(xs, x[rows])
        np.testing.assert_array_equal(ys, y[rows])
        for f in split_files(prepared, split):
            assert pq.read_schema(f).equals(split_schema(4), check_metadata=False)
    assert len(split_files(prepared, "train")) == 4


def test_groups_are_written_as_a_partition_by_prep_writes_them(tmp_path):
    x, y = _data(12)
    groups = np.array(["a", "b", "c"] * 4)
    prepared = write_prepared(tmp_path / "p", x, y, {"train": slice(0, 9), "test": slice(9, 12)},
                              groups=groups, partition_by="site")
    assert prepared.manifest["partition_column"] == {"source": "site", "column": GROUP_COL,
                                                     "distinct": {"train": 3, "val": 0, "test": 3}}
    assert prepared.manifest["schema"][GROUP_COL] == "string"
    assert read_groups(prepared, "test").tolist() == ["a", "b", "c"]


def test_the_same_arrays_give_the_same_content_hash(tmp_path):
    x, y = _data()
    splits = {"train": slice(0, 40), "test": slice(40, 50)}
    a = write_prepared(tmp_path / "a", x, y, splits).manifest["content_hash"]
    assert write_prepared(tmp_path / "b", x, y, splits).manifest["content_hash"] == a
    assert write_prepared(tmp_path / "c", x, y, {"train": slice(0, 30), "test": slice(30, 50)}
                          ).manifest["content_hash"] != a


def test_an_existing_folder_or_an_unknown_split_is_refused(tmp_path):
    x, y = _data()
    write_prepared(tmp_path / "p", x, y, {"train": slice(0, 50)})
    with pytest.raises(FileExistsError):
        write_prepared(tmp_path / "p", x, y, {"train": slice(0, 50)})
    with pytest.raises(ValueError, match="unknown split"):
        write_prepared(tmp_path / "q", x, y, {"training": slice(0, 50)})
