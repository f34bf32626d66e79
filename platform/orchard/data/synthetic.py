"""Prepared data written from in-memory arrays, without Spark: the fixtures of tests and benchmarks.

The folder follows manifest.py's contract as prep writes it (same schema, file cutting and manifest
keys), so everything downstream of ``prepare`` can be exercised on known arrays in milliseconds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from orchard.data.manifest import GROUP_COL, LABEL_COL, SPLITS, PreparedData, load_manifest
from orchard.data.write import contract_table, file_records, split_schema, write_manifest, write_parts


def write_prepared(path: str | Path, x: np.ndarray, y: np.ndarray, splits: Mapping[str, Any], *,
                   groups: np.ndarray | None = None, partition_by: str = GROUP_COL, files: int = 2,
                   **manifest: Any) -> PreparedData:
    """Write rows of ``x`` (n, D) / ``y`` (n,) as a prepared folder at ``path`` (which must not exist yet).

    ``splits`` maps train/val/test to the rows each holds (indices or a slice into ``x``, in the order
    written); a split left out is empty. Integer ``y`` makes a classification set (classes 0..max),
    float ``y`` a regression set (float32 labels, ``target_stats`` from train). With ``groups`` (one
    string per row) every split carries the ``group`` column, as a prep with ``federated.partition_by:
    <partition_by>`` writes it.
    ``files`` is ``files_per_split``. Keyword arguments override or add manifest keys (``dataset``,
    ``stats``, ``image_shape``...).
    """
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"splits: unknown split(s) {sorted(unknown)}; the contract has {list(SPLITS)}")
    path = Path(path)
    x, y = np.asarray(x, np.float32), np.asarray(y)
    regression = not np.issubdtype(y.dtype, np.integer)
    y = y.astype(np.float32 if regression else np.int64)
    rows = {s: np.arange(len(y))[splits[s]] if s in splits else np.zeros(0, np.int64) for s in SPLITS}
    path.mkdir(parents=True)
    for split, idx in rows.items():
        table = contract_table(x[idx], y[idx], None if groups is None else np.asarray(groups)[idx])
        write_parts(table, path / split, files)
    files = {"files": file_records(path)}  # as prep records them, so prepare() can verify the folder
    write_manifest(path, {**_manifest(x, y, rows, regression, groups, partition_by), **files, **manifest})
    return load_manifest(path)


def _manifest(x: np.ndarray, y: np.ndarray, rows: dict[str, np.ndarray], regression: bool,
              groups: np.ndarray | None, partition_by: str) -> dict[str, Any]:
    dim = int(x.shape[1])
    digest = hashlib.sha256(x.tobytes() + y.tobytes())
    for split, idx in rows.items():  # which rows went where, not only their order
        digest.update(f"{split}:{len(idx)}:".encode() + idx.astype(np.int64).tobytes())
    counts = {s: int(len(idx)) for s, idx in rows.items()}
    total = sum(counts.values())
    classes = [] if regression or not len(y) else list(range(int(y.max()) + 1))
    manifest: dict[str, Any] = {
        "version": 1, "source": f"synthetic:{len(y)}x{dim}", "dataset": "synthetic",
        "content_hash": digest.hexdigest(), "label_column": LABEL_COL, "features": [f"f{i}" for i in range(dim)],
        "feature_dim": dim, "image_shape": None, "classes": classes, "num_classes": len(classes),
        "task": "regression" if regression else "classification", "normalize": "none", "stats": {},
        "counts": {"input": total, "quarantined": 0, "duplicates": 0, **counts},
        "splits": {s: s for s in SPLITS}, "quarantine_path": None,
        "schema": {f.name: str(f.type) for f in split_schema(dim, regression, groups is not None)},
        "split": {s: counts[s] / max(total, 1) for s in SPLITS} | {"seed": None, "stratify": False},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"), "spark_version": None,
    }
    if regression:
        train = y[rows["train"]]
        manifest["target_stats"] = {"mean": float(train.mean()) if len(train) else 0.0,
                                    "std": float(train.std()) if len(train) and train.std() else 1.0}
    if groups is not None:
        groups = np.asarray(groups)
        manifest["partition_column"] = {"source": partition_by, "column": GROUP_COL,
                                        "distinct": {s: len(set(groups[idx].tolist())) for s, idx in rows.items()}}
    return manifest
