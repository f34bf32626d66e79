"""An unchanged source + data section is reused without Spark; a content change gives a new folder."""

from __future__ import annotations

import pytest

from orchard.config import DataSpec
from orchard.data import prepare
from orchard.data.source import content_hash, resolve
from tests.data.prep_helpers import write_csv


def test_second_prepare_reuses_the_folder_without_starting_spark_or_rewriting(spark, make_spec, monkeypatch):
    first = prepare(make_spec(source="sklearn:breast_cancer"))
    stamp = (first.path / "manifest.json").stat().st_mtime_ns

    def no_spark(*args, **kwargs):
        raise AssertionError("Spark must not start for an unchanged prep")

    monkeypatch.setattr("orchard.data.session.spark_for", no_spark)
    second = prepare(make_spec(source="sklearn:breast_cancer", spark={"shuffle_partitions": 9}))
    assert second.reused and not first.reused
    assert second.path == first.path
    assert second.manifest == first.manifest
    assert (first.path / "manifest.json").stat().st_mtime_ns == stamp


def test_changing_normalize_gives_a_different_folder(spark, make_spec):
    standard = prepare(make_spec(source="sklearn:breast_cancer"))
    minmax = prepare(make_spec(source="sklearn:breast_cancer", normalize="minmax"))
    assert not minmax.reused
    assert minmax.path != standard.path and standard.path.exists()


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({"output": "elsewhere"}, True),
        ({"spark": {"master": "local[1]", "shuffle_partitions": 1}}, True),
        ({"normalize": "none"}, False),
        ({"split": {"seed": 1}}, False),
        ({"files_per_split": 4}, False),
    ],
)
def test_content_hash_ignores_only_settings_that_do_not_change_the_output(tmp_path, change, same):
    path = write_csv(tmp_path / "t.csv", ["x", "label"], [[1, 0], [2, 1]])
    base = DataSpec(source=str(path))
    other = DataSpec(**{**base.model_dump(), **change})
    assert (content_hash(resolve(base), base) == content_hash(resolve(other), other)) is same


def test_content_hash_follows_the_file_bytes(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["x", "label"], [[1, 0], [2, 1]])
    data = DataSpec(source=str(path))
    before = content_hash(resolve(data), data)
    write_csv(path, ["x", "label"], [[1, 0], [3, 1]])
    assert content_hash(resolve(data), data) != before
