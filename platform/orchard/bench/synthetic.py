"""Large synthetic classification data in the prepared-data layout, for benchmarks at scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchard.data.manifest import FEATURES_COL, LABEL_COL, MANIFEST, PreparedData, load_manifest


def make_classification(rows: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class clusters: learnable, so a benchmark also trains something real."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    centers = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    x = centers[y] + rng.normal(0, 1.5, (rows, dim)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def write_prepared(root: Path, rows: int, dim: int, classes: int, image_shape: list[int] | None = None,
                   files: int = 4, seed: int = 0) -> PreparedData:
    x, y = make_classification(rows, dim, classes, seed)
    n_val = n_test = max(classes, rows // 20)
    parts = {"test": slice(0, n_test), "val": slice(n_test, n_test + n_val), "train": slice(n_test + n_val, rows)}
    for split, sl in parts.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        xs, ys = x[sl], y[sl]
        for i, idx in enumerate(np.array_split(np.arange(len(ys)), files)):
            feats = pa.FixedSizeListArray.from_arrays(pa.array(xs[idx].reshape(-1), pa.float32()), dim)
            pq.write_table(pa.table({FEATURES_COL: feats, LABEL_COL: pa.array(ys[idx], pa.int64())}),
                           folder / f"part-{i:05d}.parquet")
    counts = {s: int(len(y[sl])) for s, sl in parts.items()}
    manifest = {
        "version": 1, "source": f"synthetic:{rows}x{dim}", "dataset": "synthetic", "content_hash": f"synthetic-{seed}",
        "label_column": LABEL_COL, "features": [f"f{i}" for i in range(dim)], "feature_dim": dim,
        "image_shape": image_shape, "classes": list(range(classes)), "num_classes": classes,
        "task": "classification", "normalize": "none", "stats": {},
        "counts": {"input": rows, "quarantined": 0, "duplicates": 0, **counts},
        "splits": {s: s for s in parts}, "quarantine_path": None,
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    return load_manifest(root)


def load_split(prepared: PreparedData, split: str) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(prepared.split_path(split))
    col = table.column(FEATURES_COL).combine_chunks()
    x = col.values.to_numpy(zero_copy_only=False).reshape(-1, prepared.manifest["feature_dim"])
    return np.ascontiguousarray(x, dtype=np.float32), table.column(LABEL_COL).to_numpy()
