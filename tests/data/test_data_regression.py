"""A regression target (sklearn's diabetes): float labels, target statistics from train only."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchard.data import prepare
from orchard.data.manifest import read_split


def test_diabetes_prepares_as_regression_with_train_target_stats(spark, make_spec):
    prepared = prepare(make_spec(source="sklearn:diabetes"))
    m = prepared.manifest
    assert m["task"] == "regression" and m["num_classes"] == 0 and m["classes"] == []
    assert sum(m["counts"][s] for s in ("train", "val", "test")) == m["counts"]["input"] == 442
    label_type = pq.read_schema(next(prepared.split_path("train").glob("*.parquet"))).field("label").type
    assert str(label_type) == "float"
    _, y_train = read_split(prepared, "train")
    _, y_test = read_split(prepared, "test")
    assert m["target_stats"]["mean"] == pytest.approx(float(np.mean(y_train)), rel=1e-5)
    assert m["target_stats"]["std"] == pytest.approx(float(np.std(y_train)), rel=1e-4)
    assert m["target_stats"]["mean"] != pytest.approx(float(np.mean(np.r_[y_train, y_test])), rel=1e-6)


def test_a_non_numeric_regression_target_is_quarantined(spark, tmp_path, make_spec):
    from tests.data.prep_helpers import write_csv

    rows = [[str(i), str(i * 2.5)] for i in range(40)] + [["7", "n/a"]]
    path = write_csv(tmp_path / "r.csv", ["x", "y"], rows)
    prepared = prepare(make_spec(source=str(path), label="y", task="regression"))
    assert prepared.manifest["counts"]["quarantined"] == 1
    q = pq.read_table(prepared.path / prepared.manifest["quarantine_path"]).to_pylist()
    assert q[0]["row"] == 41 and "non-numeric target" in q[0]["reason"]
