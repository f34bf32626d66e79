"""The partition column (federated.partition_by) survives prep as a `group` column, not as a feature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_breast_cancer

from orchard.config import FederatedSpec, SpecError, validate_spec
from orchard.data import prepare
from orchard.data.manifest import FEATURES_COL, GROUP_COL, LABEL_COL, read_split
from orchard.data.prepare import plan
from orchard.federated.partitions import PartitionError, write_partitions
from tests.data.prep_helpers import write_csv

SITES = 3


def _cancer_csv(path: Path, blank_site_rows: int = 0) -> tuple[Path, dict[tuple, str]]:
    """breast_cancer with a `site` column (row i at site-(i % 3)); returns the file and row -> site.

    A ``.parquet`` path writes Parquet (site a string column, blank = null) instead of CSV.
    """
    bunch = load_breast_cancer()
    header = [*bunch.feature_names, "site", "label"]
    rows, site_of = [], {}
    for i, (x, y) in enumerate(zip(bunch.data, bunch.target, strict=True)):
        site = "" if i < blank_site_rows else f"site-{i % SITES}"
        rows.append([*x.tolist(), site, int(y)])
        site_of[tuple(np.float32(x).tolist())] = site
    if path.suffix == ".parquet":
        columns = {name: [r[j] for r in rows] for j, name in enumerate(header)}
        columns["site"] = [v or None for v in columns["site"]]
        pq.write_table(pa.table(columns), path)
        return path, site_of
    return write_csv(path, header, rows), site_of


def _spec(csv: Path, out: Path, kind: str = "federated", **fed):
    fed = {"clients": SITES, "partition": "natural", "partition_by": "site", **fed} if kind == "federated" else {}
    return validate_spec({"name": "groups", "kind": kind, "data": {"source": str(csv), "normalize": "none",
                                                                   "output": str(out)}, "federated": fed})


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_natural_partitions_give_each_client_exactly_one_sites_rows(spark, tmp_path, fmt):
    csv, site_of = _cancer_csv(tmp_path / f"cancer.{fmt}", blank_site_rows=2)
    prepared = prepare(_spec(csv, tmp_path / "out"))
    m = prepared.manifest

    assert m["partition_column"] == {"source": "site", "column": GROUP_COL,
                                     "distinct": {"train": SITES, "val": SITES, "test": SITES}}
    assert "site" not in m["features"] and m["feature_dim"] == 30  # the client id is not a feature
    assert m["schema"][GROUP_COL] == "string"
    assert m["counts"]["quarantined"] == 2  # the rows without a site belong to no client
    # Readers that select [features, label] are unaffected by the extra column.
    x, y = read_split(prepared, "train")
    assert x.shape == (m["counts"]["train"], 30) and len(y) == len(x)

    parts = write_partitions(prepared, _spec(csv, tmp_path / "out").federated)
    seen = 0
    for i in range(SITES):
        table = pq.read_table(parts.client_file(i))
        sites = {site_of[tuple(row)] for row in table[FEATURES_COL].to_pylist()}  # by the CSV, not the column
        assert sites == {f"site-{i}"}  # ids sorted: client i holds site-i, and only it
        assert set(table[GROUP_COL].to_pylist()) == sites
        seen += table.num_rows
        assert parts.label_counts[i] == np.bincount(table[LABEL_COL].to_numpy(), minlength=2).tolist()
    assert seen == m["counts"]["train"]
    assert parts.ids == [f"site-{i}" for i in range(SITES)]

    with pytest.raises(PartitionError, match=r"federated.clients=4.*3 distinct values"):
        write_partitions(prepared, _spec(csv, tmp_path / "out", clients=4).federated)


def test_the_partition_column_changes_the_content_hash_and_is_no_feature(tmp_path):
    csv, _ = _cancer_csv(tmp_path / "cancer.csv")
    plain_source, _, plain, group = plan(_spec(csv, tmp_path, kind="train"))
    natural_source, _, natural, by = plan(_spec(csv, tmp_path))
    assert group is None and by == "site"
    assert plain != natural  # a folder without the column must never be reused for natural partitions
    assert "site" in plain_source.features  # a plain job takes every column but the label, as before
    assert "site" not in natural_source.features
    iid = _spec(csv, tmp_path).model_copy(update={"federated": FederatedSpec(clients=SITES)})
    assert plan(iid)[2] == plain  # only a natural partition changes the prep


def test_a_missing_or_misused_partition_column_is_refused_before_spark(tmp_path):
    csv, _ = _cancer_csv(tmp_path / "cancer.csv")
    with pytest.raises(SpecError, match=r"federated.partition_by: column 'hospital' not found"):
        prepare(_spec(csv, tmp_path, partition_by="hospital"))
    with pytest.raises(SpecError, match=r"federated.partition_by: 'label' is the label column"):
        prepare(_spec(csv, tmp_path, partition_by="label"))
    digits = validate_spec({"name": "g", "kind": "federated",
                            "federated": {"partition": "natural", "partition_by": "site"}})
    with pytest.raises(SpecError, match="federated.partition_by: sklearn:digits has no column 'site'"):
        prepare(digits)
