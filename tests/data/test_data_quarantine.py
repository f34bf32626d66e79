"""Malformed rows are quarantined with their row number and a reason — never dropped, never nulled."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_breast_cancer

from orchard.config import SpecError
from orchard.data import prepare
from orchard.data.manifest import read_split
from tests.data.prep_helpers import write_csv


@pytest.fixture(scope="module")
def cancer_rows() -> tuple[list[str], list[list]]:
    bunch = load_breast_cancer()
    header = [*bunch.feature_names, "diagnosis"]
    rows = [[*map(float, x), int(y)] for x, y in zip(bunch.data, bunch.target, strict=True)]
    return header, rows


def _line(values: list) -> str:
    return ",".join(str(v) for v in values)


def test_malformed_rows_of_every_kind_are_quarantined_with_row_and_reason(
    spark, make_spec, tmp_path, cancer_rows
):
    header, good = cancer_rows
    rows: list = list(good[:400])
    # 1-based data row number (header excluded) -> (line as written, expected reason fragment)
    bad = {
        11: (_line(["abc", *good[400][1:]]), "non-numeric value in column 'mean radius': abc"),
        52: (_line(good[401][:10]), "expected 31 fields, got 10"),
        103: (_line([*good[402], 1.5, 2.5]), "expected 31 fields, got 33"),
        154: (_line([*good[403][:-1], ""]), "empty label in column 'diagnosis'"),
        205: (_line([*good[404][:5], "", *good[404][6:]]), "empty value in column 'mean compactness'"),
        256: (_line([*good[405][:3], "NaN", *good[405][4:]]), "non-finite value in column 'mean area'"),
        307: (_line(['"1.0', *good[406][1:]]), "malformed quoting"),
    }
    for row in sorted(bad):
        rows.insert(row - 1, bad[row][0])
    duplicates = [good[0], good[1], good[1]]
    path = write_csv(tmp_path / "cancer.csv", header, rows + duplicates)

    prepared = prepare(make_spec(source=str(path), label="diagnosis"))

    counts = prepared.manifest["counts"]
    assert counts["input"] == len(rows) + len(duplicates)
    assert counts["quarantined"] == len(bad)
    assert counts["duplicates"] == len(duplicates)
    assert (
        counts["train"] + counts["val"] + counts["test"] + counts["quarantined"] + counts["duplicates"]
        == counts["input"]
    )
    assert prepared.manifest["quarantine_path"] == "quarantine"
    quarantine = pq.read_table(prepared.path / "quarantine").to_pylist()
    assert [q["row"] for q in quarantine] == sorted(bad)
    for q in quarantine:
        line, reason = bad[q["row"]]
        assert reason in q["reason"]
        assert q["raw"] == line


def test_clean_rows_keep_their_values_and_no_row_is_nulled(spark, make_spec, tmp_path, cancer_rows):
    header, good = cancer_rows
    rows = list(good[:100]) + [_line(["oops", *good[100][1:]])]
    path = write_csv(tmp_path / "few.csv", header, rows)
    prepared = prepare(make_spec(source=str(path), label="diagnosis", normalize="none"))
    x = np.concatenate([read_split(prepared, s)[0] for s in ("train", "val", "test")])
    assert x.shape == (100, 30)
    assert np.isfinite(x).all()
    expected = {tuple(np.float32(v) for v in r[:-1]) for r in good[:100]}
    assert {tuple(r) for r in x.tolist()} == {tuple(float(v) for v in r) for r in expected}


def test_string_labels_become_sorted_class_indices(spark, make_spec, tmp_path):
    rows = [[i, i % 5, ["cat", "dog", "emu"][i % 3]] for i in range(60)] + [[1, 2, "  "]]
    path = write_csv(tmp_path / "animals.csv", ["x", "y", "kind"], rows)
    prepared = prepare(make_spec(source=str(path), label="kind", normalize="none"))
    assert prepared.manifest["classes"] == ["cat", "dog", "emu"]
    assert prepared.quarantined == 1
    x, y = read_split(prepared, "train")
    assert y.dtype == np.int64
    # The class index points back at the label each row had.
    assert all(
        ["cat", "dog", "emu"][label] == ["cat", "dog", "emu"][int(row[0]) % 3]
        for row, label in zip(x, y, strict=True)
    )


def test_numeric_labels_written_differently_are_one_class(spark, make_spec, tmp_path):
    rows = [[i, i % 4, ["1", "1.0", "2", "2.00"][i % 4]] for i in range(40)]
    path = write_csv(tmp_path / "numeric.csv", ["x", "y", "label"], rows)
    prepared = prepare(make_spec(source=str(path), normalize="none"))
    assert prepared.manifest["classes"] == [1, 2]


def test_a_single_class_after_cleaning_is_refused_naming_the_column(spark, make_spec, tmp_path):
    rows = [[i, i * 2, "yes"] for i in range(20)] + [["x", 1, "no"]]
    path = write_csv(tmp_path / "one_class.csv", ["a", "b", "answer"], rows)
    with pytest.raises(SpecError, match="'answer'.*at least 2 classes"):
        prepare(make_spec(source=str(path), label="answer"))
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())
