"""The prepared folder follows manifest.py's contract: one fixed-width float32 tensor column, then int64 class
labels (float32 for a regression target, see test_data_regression.py)."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchard.data import load_manifest, prepare
from orchard.data.manifest import read_split
from orchard.data.prepare import prepared_path

MANIFEST_KEYS = {
    "version", "source", "dataset", "content_hash", "label_column", "features", "feature_dim", "image_shape",
    "classes", "num_classes", "task", "normalize", "stats", "counts", "splits", "quarantine_path", "schema",
    "split", "created_at", "spark_version", "overlap", "files",
}  # fmt: skip


def test_splits_hold_one_fixed_size_float32_tensor_column_and_int64_labels(spark, make_spec):
    prepared = prepare(make_spec(files_per_split=3))
    expected = pa.schema([("features", pa.list_(pa.float32(), 64)), ("label", pa.int64())])
    for split in ("train", "val", "test"):
        files = sorted(prepared.split_path(split).iterdir())
        assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
        for f in files:
            assert pq.read_schema(f).equals(expected, check_metadata=False)
            assert pq.read_metadata(f).num_rows > 0
    assert prepared.manifest["schema"] == {"features": "fixed_size_list<item: float>[64]", "label": "int64"}


def test_manifest_has_every_contract_key_and_matches_the_files(spark, make_spec):
    prepared = prepare(make_spec())
    manifest = json.loads((prepared.path / "manifest.json").read_text())
    assert set(manifest) == MANIFEST_KEYS
    assert manifest == load_manifest(prepared.path).manifest
    assert manifest["version"] == 1 and manifest["task"] == "classification"
    assert manifest["dataset"] == "digits" and manifest["source"] == "sklearn:digits"
    assert prepared.path.name == f"digits-{manifest['content_hash']}"
    assert prepared_path(make_spec()) == prepared.path  # found without Spark, as the Flower App does
    assert manifest["image_shape"] == [1, 8, 8] and manifest["feature_dim"] == 64
    assert manifest["classes"] == list(range(10)) and manifest["num_classes"] == 10
    assert manifest["quarantine_path"] is None and not (prepared.path / "quarantine").exists()
    for split in ("train", "val", "test"):
        assert len(read_split(prepared, split)[1]) == manifest["counts"][split]
    # Nothing but the finished dataset is left in the output folder.
    assert sorted(p.name for p in prepared.path.parent.iterdir()) == [prepared.path.name]
    assert sorted(p.name for p in prepared.path.iterdir()) == ["manifest.json", "test", "train", "val"]


def test_parquet_source_with_nulls_is_read_numbered_and_cleaned(spark, make_spec, tmp_path):
    frame = pd.DataFrame(
        {"a": [float(i % 9) for i in range(80)], "b.dotted": [float(i % 5) for i in range(80)]}
    )
    frame["target"] = [i % 2 for i in range(80)]
    frame.loc[[9, 40], "a"] = None
    folder = tmp_path / "source"
    folder.mkdir()
    pq.write_table(pa.Table.from_pandas(frame.iloc[:50], preserve_index=False), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pandas(frame.iloc[50:], preserve_index=False), folder / "part-1.parquet")

    prepared = prepare(make_spec(source=str(folder), label="target", normalize="minmax"))

    assert prepared.manifest["features"] == ["a", "b.dotted"]
    assert prepared.manifest["dataset"] == "source"
    quarantine = pq.read_table(prepared.path / "quarantine").to_pylist()
    assert [(q["row"], q["reason"]) for q in quarantine] == [
        (10, "empty value in column 'a'"),
        (41, "empty value in column 'a'"),
    ]
    counts = prepared.manifest["counts"]
    assert (
        counts["train"] + counts["val"] + counts["test"] + counts["quarantined"] + counts["duplicates"] == 80
    )
