"""Normalization statistics come from the training split only and are applied to every split."""

from __future__ import annotations

import numpy as np

from orchard.data import prepare
from orchard.data.manifest import read_split


def test_standard_stats_equal_numpy_on_raw_train_rows_only(spark, make_spec, digits_raw):
    prepared = prepare(make_spec(normalize="standard"))
    raw_train, _ = read_split(digits_raw, "train")
    stats = prepared.manifest["stats"]

    np.testing.assert_allclose(
        stats["mean"], raw_train.astype(np.float64).mean(axis=0), rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(stats["std"], raw_train.astype(np.float64).std(axis=0), rtol=1e-9, atol=1e-12)
    everything = np.concatenate([read_split(digits_raw, s)[0] for s in ("train", "val", "test")])
    assert not np.allclose(stats["mean"], everything.mean(axis=0), rtol=1e-6)


def test_standard_scaling_is_applied_to_every_split_with_train_stats(spark, make_spec, digits_raw):
    prepared = prepare(make_spec(normalize="standard"))
    mean, std = (np.array(prepared.manifest["stats"][k]) for k in ("mean", "std"))
    scale = np.where(std == 0, 1.0, std)  # a constant pixel keeps scale 1 instead of dividing by zero
    for split in ("train", "val", "test"):
        raw, raw_labels = read_split(digits_raw, split)
        scaled, labels = read_split(prepared, split)
        # Same seed -> same rows in the same order, whatever the normalization.
        np.testing.assert_array_equal(labels, raw_labels)
        np.testing.assert_allclose(scaled, (raw - mean) / scale, rtol=1e-5, atol=1e-5)
        assert np.isfinite(scaled).all()
    train, _ = read_split(prepared, "train")
    varying = std > 0
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train[:, varying].std(axis=0), 1, atol=1e-4)


def test_minmax_stats_come_from_train_split_and_map_it_into_unit_range(spark, make_spec, digits_raw):
    prepared = prepare(make_spec(normalize="minmax"))
    raw_train, _ = read_split(digits_raw, "train")
    stats = prepared.manifest["stats"]
    np.testing.assert_array_equal(stats["min"], raw_train.min(axis=0))
    np.testing.assert_array_equal(stats["max"], raw_train.max(axis=0))
    train, _ = read_split(prepared, "train")
    assert train.min() >= 0 and train.max() <= 1 + 1e-6
