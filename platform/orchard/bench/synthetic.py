"""Large synthetic classification data in the prepared-data layout, for benchmarks at scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orchard.data.manifest import PreparedData
from orchard.data.synthetic import write_prepared


def make_classification(rows: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class clusters: learnable, so a benchmark also trains something real."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    centers = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    x = centers[y] + rng.normal(0, 1.5, (rows, dim)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def write_classification(root: Path, rows: int, dim: int, classes: int, image_shape: list[int] | None = None,
                         files: int = 4, seed: int = 0) -> PreparedData:
    """``rows`` clustered rows at ``root``: test and val ``max(classes, rows // 20)`` rows each, the rest train."""
    x, y = make_classification(rows, dim, classes, seed)
    n_val = n_test = max(classes, rows // 20)
    splits = {"test": slice(0, n_test), "val": slice(n_test, n_test + n_val), "train": slice(n_test + n_val, rows)}
    return write_prepared(root, x, y, splits, files=files, source=f"synthetic:{rows}x{dim}",
                          content_hash=f"synthetic-{seed}", image_shape=image_shape, classes=list(range(classes)),
                          num_classes=classes)
