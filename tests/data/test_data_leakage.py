"""No feature vector sits in two splits: not under two labels, not under two sites (no train/test leakage)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchard.config import validate_spec
from orchard.data import prepare
from orchard.data.manifest import GROUP_COL
from tests.data.prep_helpers import read_split, write_csv

SPLITS = ("train", "val", "test")
N_BASE, N_CONFLICT, N_TWO_SITES, N_BOTH = 300, 40, 40, 20


def _leaky_csv(path: Path) -> tuple[Path, dict[str, int]]:
    """300 distinct feature rows (label x % 3, site x % 2); 40 of them again with another label,
    40 again at the other site, 20 again with another label at the other site, plus 5 exact duplicates."""
    rows = []
    for i in range(N_BASE):
        rows.append([i, (i * 7) % 31, i % 3, f"site-{i % 2}"])
    for i in range(N_CONFLICT):
        rows.append([i, (i * 7) % 31, (i + 1) % 3, f"site-{i % 2}"])
    for i in range(100, 100 + N_TWO_SITES):
        rows.append([i, (i * 7) % 31, i % 3, f"site-{(i + 1) % 2}"])
    for i in range(200, 200 + N_BOTH):
        rows.append([i, (i * 7) % 31, (i + 2) % 3, f"site-{(i + 1) % 2}"])
    duplicates = [list(r) for r in rows[:5]]
    expected = {"input": len(rows) + len(duplicates), "duplicates": len(duplicates),
                "conflicting_labels": 2 * (N_CONFLICT + N_BOTH),
                "shared_features": 2 * (N_CONFLICT + N_TWO_SITES + N_BOTH)}
    return write_csv(path, ["a", "b", "label", "site"], rows + duplicates), expected


def _prepare(csv: Path, out: Path, federated: bool, seed: int = 42):
    data = {"source": str(csv), "normalize": "none", "output": str(out),
            "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": seed}}
    if federated:
        return prepare(validate_spec({"name": "leak", "kind": "federated", "data": data, "federated": {
            "clients": 2, "partition": "natural", "partition_by": "site"}}))
    data["features"] = ["a", "b"]
    return prepare(validate_spec({"name": "leak", "kind": "train", "data": data}))


def _splits_of_each_vector(prepared) -> dict[tuple, set[str]]:
    where: dict[tuple, set[str]] = defaultdict(set)
    for split in SPLITS:
        x, _ = read_split(prepared, split)
        for row in x.tolist():
            where[tuple(row)].add(split)
    return where


@pytest.mark.slow
@pytest.mark.parametrize("federated", [False, True], ids=["labels", "labels-and-sites"])
def test_a_feature_vector_under_two_labels_or_two_sites_lands_in_one_split(spark, tmp_path, federated):
    csv, expected = _leaky_csv(tmp_path / "leaky.csv")
    prepared = _prepare(csv, tmp_path / "out", federated)
    m = prepared.manifest
    counts = m["counts"]

    where = _splits_of_each_vector(prepared)
    assert len(where) == N_BASE
    assert all(len(s) == 1 for s in where.values()), {v: s for v, s in where.items() if len(s) > 1}
    assert counts["quarantined"] == 0
    assert sum(counts[s] for s in SPLITS) + counts["quarantined"] + counts["duplicates"] == counts["input"]
    assert counts["input"] == expected["input"]
    # Without the site column, rows that differ only by site are exact duplicates of each other.
    site_only = 0 if federated else N_TWO_SITES
    assert counts["duplicates"] == expected["duplicates"] + site_only
    assert m["overlap"]["conflicting_labels"] == expected["conflicting_labels"]
    assert m["overlap"]["shared_features"] == expected["shared_features"] - 2 * site_only
    # Splitting by vector still keeps every split near its share (each shared vector moves at most 1 row).
    distinct = sum(counts[s] for s in SPLITS)
    for split in SPLITS:
        assert abs(counts[split] - distinct * m["split"][split]) <= 3 + m["overlap"]["shared_features"] // 2
    if federated:
        sites = {s: set(pq.read_table(prepared.split_path(s), columns=[GROUP_COL])[GROUP_COL].to_pylist())
                 for s in SPLITS}
        assert all(v == {"site-0", "site-1"} for v in sites.values())
    print(f"\n{'federated' if federated else 'train'}: {counts} overlap={m['overlap']}")

