"""Partitions: deterministic, exact cover of the train split, one file per client, each scheme's skew."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from orchard.config import FederatedSpec
from orchard.data.manifest import load_manifest, read_split, read_xy
from orchard.federated.partitions import (
    META_FILE,
    PartitionError,
    client_file,
    partition_indices,
    partition_table,
    write_partitions,
    write_val_partitions,
)

SCHEMES = {
    "iid": {},
    "dirichlet": {"alpha": 0.3},
    "pathological": {"classes_per_client": 3},
    "shard": {"shards_per_client": 2},
}


def _rows(x: np.ndarray, y: np.ndarray) -> Counter:
    return Counter(xi.tobytes() + int(yi).to_bytes(8, "little") for xi, yi in zip(x, y, strict=True))


def _skew(label_counts: list[list[int]]) -> float:
    """Mean total-variation distance between each client's label mix and the overall mix."""
    counts = np.asarray(label_counts, dtype=np.float64)
    overall = counts.sum(0) / counts.sum()
    mixes = counts / counts.sum(1, keepdims=True)
    return float(np.mean(0.5 * np.abs(mixes - overall).sum(1)))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_partitions_cover_the_train_split_exactly_once(fresh_digits, scheme):
    fed = FederatedSpec(clients=12, partition=scheme, seed=3, **SCHEMES[scheme])
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


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_partitions_are_deterministic_and_reused(fresh_digits, scheme):
    fed = FederatedSpec(clients=12, partition=scheme, seed=11, **SCHEMES[scheme])
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
    assert min(skewed.counts) >= FederatedSpec().min_partition_rows


def test_default_min_partition_rows_lets_1000_skewed_clients_split_70000_rows():
    """The issue's scale: at the old floor of 10 rows no Dirichlet(0.3) draw in 100 fitted; the default does."""
    labels = np.random.default_rng(0).integers(0, 10, 70_000)
    fed = FederatedSpec(clients=1000, partition="dirichlet", alpha=0.3)
    parts = partition_indices(labels, fed)
    assert len(parts) == 1000 and min(map(len, parts)) >= fed.min_partition_rows
    assert sum(map(len, parts)) == 70_000
    with pytest.raises(PartitionError, match=r"federated.min_partition_rows=71: 1000 clients x 71 rows exceeds"):
        partition_indices(labels, fed.model_copy(update={"min_partition_rows": 71}))


def test_client_validation_shares_cover_the_val_split_with_each_clients_label_mix(digits_prepared):
    # A partition no other test uses (seed 5): its folder gains a val/ subfolder.
    fed = FederatedSpec(clients=6, partition="dirichlet", alpha=0.3, seed=5, client_eval=1.0)
    parts = write_partitions(digits_prepared, fed)
    folder = write_val_partitions(digits_prepared, fed, parts)
    dim = digits_prepared.manifest["feature_dim"]
    shares = [read_xy([client_file(folder, i)], dim) for i in range(6)]
    x_val, y_val = read_split(digits_prepared, "val")
    assert sum((_rows(*xy) for xy in shares), Counter()) == _rows(x_val, y_val)  # every val row, once
    for i, (_, y) in enumerate(shares):  # no validation rows of a class the client never trains on
        assert set(np.unique(y)) <= {c for c, n in enumerate(parts.label_counts[i]) if n > 0}


def test_impossible_partitions_are_refused_with_the_key(digits_prepared):
    labels = read_split(digits_prepared, "train")[1]
    with pytest.raises(PartitionError, match="federated.clients"):
        partition_indices(labels, FederatedSpec(clients=len(labels) + 1))
    with pytest.raises(PartitionError, match="federated.alpha=0.01: no Dirichlet draw in 100 .* federated.min_partition_rows"):
        # 600 clients of ~2 rows each: a Dirichlet draw this skewed always leaves some client empty.
        partition_indices(labels, FederatedSpec(clients=600, partition="dirichlet", alpha=0.01))


def test_dirichlet_refuses_a_regression_target():
    with pytest.raises(PartitionError, match="partition: iid"):
        partition_indices(np.linspace(0, 1, 100, dtype=np.float32), FederatedSpec(clients=4, partition="dirichlet"))


def test_pathological_clients_hold_exactly_k_classes_each(digits_prepared):
    labels = read_split(digits_prepared, "train")[1]
    for k in (1, 2, 4):
        parts = partition_indices(labels, FederatedSpec(clients=20, partition="pathological", classes_per_client=k))
        assert [len(np.unique(labels[rows])) for rows in parts] == [k] * 20
        # Client i surely holds class i % 10 (first-deterministic assignment): every class is used.
        assert all(i % 10 in labels[rows] for i, rows in enumerate(parts))


def test_shard_clients_hold_whole_label_sorted_shards(digits_prepared):
    labels = read_split(digits_prepared, "train")[1]
    clients, per = 10, 2
    parts = partition_indices(labels, FederatedSpec(clients=clients, partition="shard", shards_per_client=per))
    # The shards as the scheme defines them: the labels sorted, cut into clients * per near-equal runs.
    shards = [np.bincount(run, minlength=10) for run in np.array_split(np.sort(labels), clients * per)]
    used: list[int] = []
    for rows in parts:
        mix = np.bincount(labels[rows], minlength=10)
        pairs = [(a, b) for a in range(len(shards)) for b in range(a + 1, len(shards))
                 if a not in used and b not in used and np.array_equal(shards[a] + shards[b], mix)]
        assert pairs, "a client's labels are not the union of two unused shards"
        used += pairs[0]
        assert len(np.unique(labels[rows])) <= 2 * per  # a shard spans at most two neighbouring classes
    assert sorted(used) == list(range(clients * per))
    iid = partition_indices(labels, FederatedSpec(clients=clients, partition="iid"))
    skew = [_skew([np.bincount(labels[r], minlength=10) for r in p]) for p in (iid, parts)]
    assert skew[0] < 0.15 and skew[1] > 0.6  # observed here: iid 0.105, shard 0.797


def test_natural_partitions_give_one_id_per_client(digits_prepared):
    labels = read_split(digits_prepared, "train")[1]
    sites = np.array([f"site-{c % 3}" for c in labels], dtype=object)  # a site that holds certain digits
    fed = FederatedSpec(clients=3, partition="natural", partition_by="site")
    parts = partition_indices(labels, fed, groups=sites)
    assert [set(sites[rows]) for rows in parts] == [{"site-0"}, {"site-1"}, {"site-2"}]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    with pytest.raises(PartitionError, match=r"federated.clients=4, .*'site' has 3 distinct values.*clients: 3"):
        partition_indices(labels, fed.model_copy(update={"clients": 4}), groups=sites)


def test_natural_needs_data_prepared_with_the_partition_column(fresh_digits):
    fed = FederatedSpec(clients=3, partition="natural", partition_by="site")
    with pytest.raises(PartitionError, match="federated.partition_by='site': .* has no partition column"):
        write_partitions(fresh_digits, fed)


def test_impossible_new_schemes_are_refused_with_the_key(digits_prepared):
    labels = read_split(digits_prepared, "train")[1]
    with pytest.raises(PartitionError, match="federated.classes_per_client=11 exceeds the 10 classes"):
        partition_indices(labels, FederatedSpec(clients=20, partition="pathological", classes_per_client=11))
    # 3 clients x 2 classes cannot hold 10 classes: rows would be lost, so it is refused.
    with pytest.raises(PartitionError, match=r"classes_per_client=2 with federated.clients=3: classes \[.*no client"):
        partition_indices(labels, FederatedSpec(clients=3, partition="pathological", classes_per_client=2))
    with pytest.raises(PartitionError, match="federated.shards_per_client=2: .* only"):
        partition_indices(labels, FederatedSpec(clients=len(labels) // 2 + 1, partition="shard"))
    with pytest.raises(PartitionError, match="partition=pathological .*regression"):
        partition_indices(np.linspace(0, 1, 100, dtype=np.float32),
                          FederatedSpec(clients=4, partition="pathological"))


def test_a_regression_target_partitions_with_its_float_labels(fresh_digits):
    # The digits folder relabelled as a regression job: labels are read (and written) as float32.
    manifest = {**fresh_digits.manifest, "task": "regression", "num_classes": 0, "classes": []}
    (fresh_digits.path / "manifest.json").write_text(__import__("json").dumps(manifest))
    prepared = load_manifest(fresh_digits.path)
    parts = write_partitions(prepared, FederatedSpec(clients=3, partition="shard", shards_per_client=1))
    x, y = read_xy([parts.client_file(0)], manifest["feature_dim"], np.float32)
    assert y.dtype == np.float32 and len(y) == parts.counts[0]
    assert parts.label_counts == []
    assert partition_table(parts) == {"client": [0, 1, 2], "rows": parts.counts}


def test_partition_table_has_a_column_per_class(fresh_digits):
    parts = write_partitions(fresh_digits, FederatedSpec(clients=4, partition="dirichlet", alpha=0.2))
    table = partition_table(parts, fresh_digits.manifest["classes"])
    assert list(table) == ["client", "rows", *[f"class {c}" for c in range(10)]]
    assert table["rows"] == parts.counts
    assert [sum(table[f"class {c}"][i] for c in range(10)) for i in range(4)] == parts.counts


def test_changing_a_schemes_knob_writes_a_new_folder(fresh_digits):
    a = write_partitions(fresh_digits, FederatedSpec(clients=10, partition="pathological", classes_per_client=2))
    b = write_partitions(fresh_digits, FederatedSpec(clients=10, partition="pathological", classes_per_client=3))
    assert (a.folder.name, b.folder.name) == ("pathological-k2-n10-s0", "pathological-k3-n10-s0")
    assert a.folder.is_dir() and a.counts != b.counts


def test_natural_partitions_read_the_group_column_the_prep_carried(tmp_path):
    from orchard.data.synthetic import write_prepared

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)).astype(np.float32), rng.integers(0, 2, 60)
    sites = np.array([f"site-{i % 3}" for i in range(60)])
    prepared = write_prepared(tmp_path / "p", x, y, {"train": slice(0, 48), "test": slice(48, 60)},
                              groups=sites, partition_by="site")
    parts = write_partitions(prepared, FederatedSpec(clients=3, partition="natural", partition_by="site"))
    assert parts.ids == ["site-0", "site-1", "site-2"] and parts.counts == [16, 16, 16]
    for i in range(3):
        xs, _ = read_xy([parts.client_file(i)], 4)
        np.testing.assert_array_equal(xs, x[:48][sites[:48] == f"site-{i}"])
    with pytest.raises(PartitionError, match="carries 'site'"):
        write_partitions(prepared, FederatedSpec(clients=3, partition="natural", partition_by="user"))
