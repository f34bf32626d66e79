"""A real prepared dataset (sklearn digits) written without Spark, in manifest.py's contract."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchard.data.manifest import FEATURES_COL, LABEL_COL, MANIFEST, load_manifest


def _split(y: np.ndarray, fractions: tuple[float, float, float], seed: int) -> list[np.ndarray]:
    """Stratified train/val/test row indices: each class is cut in the same proportions."""
    rng = np.random.default_rng(seed)
    out: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        a = round(len(rows) * fractions[0])
        b = a + round(len(rows) * fractions[1])
        for i, part in enumerate((rows[:a], rows[a:b], rows[b:])):
            out[i].append(part)
    return [rng.permutation(np.concatenate(p)) for p in out]


def _write_split(folder: Path, x: np.ndarray, y: np.ndarray, files: int = 2) -> None:
    folder.mkdir(parents=True)
    for i, rows in enumerate(np.array_split(np.arange(len(y)), files)):
        features = pa.FixedSizeListArray.from_arrays(pa.array(x[rows].reshape(-1), pa.float32()), x.shape[1])
        table = pa.table({FEATURES_COL: features, LABEL_COL: pa.array(y[rows], pa.int64())})
        pq.write_table(table, folder / f"part-{i:05d}.parquet")


def write_digits(root: Path, seed: int = 42) -> Path:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = x.astype(np.float32), y.astype(np.int64)
    train, val, test = _split(y, (0.7, 0.15, 0.15), seed)
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0  # constant border pixels: leave them at 0 rather than divide by 0
    xs = (x - mean) / std
    content_hash = hashlib.sha256(xs.tobytes() + y.tobytes()).hexdigest()
    path = root / f"digits-{content_hash[:12]}"
    for name, rows in (("train", train), ("val", val), ("test", test)):
        _write_split(path / name, xs[rows], y[rows])
    manifest = {
        "version": 1, "source": "sklearn:digits", "dataset": "digits", "content_hash": content_hash,
        "label_column": "label", "features": [f"pixel_{i}" for i in range(x.shape[1])],
        "feature_dim": int(x.shape[1]), "image_shape": [1, 8, 8], "classes": list(range(10)),
        "num_classes": 10, "task": "classification", "normalize": "standard",
        "stats": {"mean": mean.tolist(), "std": std.tolist()},
        "counts": {"input": len(y), "quarantined": 0, "duplicates": 0,
                   "train": len(train), "val": len(val), "test": len(test)},
        "splits": {"train": "train", "val": "val", "test": "test"},
        "quarantine_path": "quarantine",
        "schema": {FEATURES_COL: f"fixed_size_list<float>[{x.shape[1]}]", LABEL_COL: "int64"},
        "split": {"train": 0.7, "val": 0.15, "test": 0.15, "seed": seed, "stratify": True},
        "created_at": "2026-01-01T00:00:00Z", "spark_version": None,
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory):
    return load_manifest(write_digits(tmp_path_factory.mktemp("data")))


@pytest.fixture
def fresh_digits(tmp_path):
    """A private copy, for tests that write partitions and must not see another test's."""
    return load_manifest(write_digits(tmp_path))
