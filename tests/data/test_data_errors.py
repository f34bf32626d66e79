"""Bad data specs are refused before any compute, naming the file, column or key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchard.config import SpecError
from orchard.data import prepare
from tests.data.prep_helpers import write_csv


@pytest.fixture
def csv_path(tmp_path):
    return write_csv(tmp_path / "points.csv", ["x", "y", "label"], [[1, 2, 0], [3, 4, 1]])


def test_missing_source_file_is_refused_naming_it(make_spec, tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(SpecError, match=r"data\.source: .*nope\.csv does not exist"):
        prepare(make_spec(source=str(missing)))


def test_missing_label_column_is_refused_naming_column_and_file(make_spec, csv_path):
    with pytest.raises(SpecError, match=r"data\.label: column 'target' not found in .*points\.csv"):
        prepare(make_spec(source=str(csv_path), label="target"))


def test_missing_feature_column_is_refused_naming_it(make_spec, csv_path):
    with pytest.raises(SpecError, match=r"data\.features: \['z'\] not found in .*points\.csv"):
        prepare(make_spec(source=str(csv_path), features=["x", "z"]))


def test_unknown_sklearn_dataset_is_refused(make_spec):
    with pytest.raises(SpecError, match="unknown dataset 'sklearn:iris'"):
        prepare(make_spec(source="sklearn:iris"))


def test_image_shape_that_does_not_fit_the_features_is_refused(make_spec):
    with pytest.raises(SpecError, match=r"data\.image_shape: \[1, 4, 4\] holds 16 values but .* 64 feature"):
        prepare(make_spec(image_shape=[1, 4, 4]))


def test_refusals_leave_no_output_behind(make_spec, tmp_path, csv_path):
    with pytest.raises(SpecError):
        prepare(make_spec(source=str(csv_path), label="target"))
    assert not (tmp_path / "prepared").exists()


def test_importing_orchard_data_does_not_import_pyspark():
    code = "import sys, orchard.data; assert 'pyspark' not in sys.modules, 'pyspark imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
