"""data.task: auto never turns a continuous numeric label into thousands of classes."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchard.config import SpecError, load_spec
from orchard.data import prepare
from orchard.data.prepare import plan
from orchard.data.source import task_of
from tests.data.prep_helpers import write_csv

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _price_csv(path: Path) -> Path:
    # A measured target: 150 rows, values like 12.37 (every one different).
    return write_csv(path, ["rooms", "area", "price"],
                     [[i % 5 + 1, 30 + i, round(10 + 0.37 * i + (i % 7) * 0.11, 2)] for i in range(150)])


def test_a_continuous_float_label_with_task_auto_is_refused_naming_data_task(spark, make_spec, tmp_path):
    csv = _price_csv(tmp_path / "prices.csv")
    with pytest.raises(SpecError, match=r"data\.task: label column 'price' .* non-integer values such as "
                                        r"[0-9.]+;.*data\.task: regression.*data\.task: classification"):
        prepare(make_spec(source=str(csv), label="price"))
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


def test_the_same_continuous_label_prepares_with_task_regression(spark, make_spec, tmp_path):
    csv = _price_csv(tmp_path / "prices.csv")
    m = prepare(make_spec(source=str(csv), label="price", task="regression")).manifest
    assert m["task"] == "regression" and m["num_classes"] == 0
    assert sum(m["counts"][s] for s in ("train", "val", "test")) == m["counts"]["input"] == 150


def test_many_distinct_integer_labels_are_refused_but_a_few_still_auto_detect_as_classes(
    spark, make_spec, tmp_path
):
    many = write_csv(tmp_path / "ages.csv", ["x", "age"], [[i, i % 101] for i in range(303)])
    with pytest.raises(SpecError, match=r"data\.task: label column 'age' .* 101 distinct integer values"):
        prepare(make_spec(source=str(many), label="age"))
    few = write_csv(tmp_path / "grades.csv", ["x", "grade"], [[i, i % 100] for i in range(300)])
    assert prepare(make_spec(source=str(few), label="grade")).manifest["num_classes"] == 100
    # Asked for explicitly, many integer classes are still allowed.
    forced = prepare(make_spec(source=str(many), label="age", task="classification"))
    assert forced.manifest["task"] == "classification" and forced.manifest["num_classes"] == 101


def test_the_shipped_diabetes_job_keeps_task_auto_and_resolves_to_regression():
    spec = load_spec(JOBS / "diabetes-mlp.yaml")
    assert spec.data.task == "auto"
    source = plan(spec)[0]
    assert task_of(source, spec.data) == "regression"
