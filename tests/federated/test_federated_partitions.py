"""Partitions: deterministic, exact cover of the train split, one file per client, Dirichlet skew."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from orchard.config import FederatedSpec
from orchard.federated.partitions import (
    META_FILE,
    MIN_PARTITION_SIZE,
    PartitionError,
    partition_indices,
    read_split,
    read_xy,
    write_partitions,
)


def _rows(x: np.ndarray, y: np.ndarray) -> Counter:
    return Counter(xi.tobytes() + int(yi).to_bytes(8, "little") for xi, yi in zip(x, y, strict=True))


def _skew(label_counts: list[list[int]]) -> float:
    """Mean total-variation distance between each client's label mix and the overall mix."""
    counts = np.asarray(label_counts, dtype=np.float64)
    overall = counts.sum(0) / counts.sum()
    mixes = counts / counts.sum(1, keepdims=True)
    return float(np.mean(0.5 * np.abs(mixes - overall).sum(1)))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_cover_the_train_split_exactly_once(fresh_digits, scheme):
    fed = FederatedSpec(clients=7, partition=scheme, alpha=0.3, seed=3)
    parts = write_partitions(fresh_digits, fed)
    dim = fresh_digits.manifest["feature_dim"]
    pieces = [read_xy([parts.client_file(i)], dim) for i in range(fed.clients)]
    union = _rows(np.concatenate([x for x, _ in pieces]), np.concatenate([y for _, y in pieces]))
    assert union == _rows(*read_split(fresh_digits, "train"))
    assert [len(y) for _, y in pieces] == parts.counts
    assert sum(parts.counts) == fresh_digits.manifest["counts"]["train"]


def test_each_client_has_only_its_own_file(fresh_digits):
    parts = write_partitions(fresh_digits, FederatedSpec(clients=4, partition="iid"))
    names = sorted(p.name for p in parts.folder.iterdir())
    assert names == sorted([META_FILE] + [f"client-{i}.parquet" for i in range(4)])
    assert parts.folder.parent.parent == fresh_digits.path
    assert parts.folder.name == "iid-n4-s0"


def test_partitions_are_deterministic_and_reused(fresh_digits):
    fed = FederatedSpec(clients=5, partition="dirichlet", alpha=0.5, seed=11)
    first = write_partitions(fresh_digits, fed)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.folder.iterdir()}
    again = write_partitions(fresh_digits, fed)
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in again.folder.iterdir()} == stamps  # reused, not rewritten

    labels = read_split(fresh_digits, "train")[1]
    same = partition_indices(labels, fed)
    other = partition_indices(labels, fed.model_copy(update={"seed": 12}))
    assert all(np.array_equal(a, b) for a, b in zip(same, partition_indices(labels, fed), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(same, other, strict=True))


def test_small_alpha_dirichlet_is_far_more_skewed_than_iid(fresh_digits):
    iid = write_partitions(fresh_digits, FederatedSpec(clients=10, partition="iid"))
    skewed = write_partitions(fresh_digits, FederatedSpec(clients=10, partition="dirichlet", alpha=0.1))
    assert _skew(iid.label_counts) < 0.15
    assert _skew(skewed.label_counts) > 0.5
    assert min(skewed.counts) >= MIN_PARTITION_SIZE


def test_impossible_partitions_are_refused_with_the_key(digits_prepared):
    labels = read_split(digits_prepared, "train")[1]
    with pytest.raises(PartitionError, match="federated.clients"):
        partition_indices(labels, FederatedSpec(clients=len(labels) + 1))
    with pytest.raises(PartitionError, match="federated.alpha"):
        # 600 clients of ~2 rows each: a Dirichlet draw this skewed always leaves some client empty.
        partition_indices(labels, FederatedSpec(clients=600, partition="dirichlet", alpha=0.01))


def test_dirichlet_refuses_a_regression_target():
    with pytest.raises(PartitionError, match="partition: iid"):
        partition_indices(np.linspace(0, 1, 100, dtype=np.float32), FederatedSpec(clients=4, partition="dirichlet"))
