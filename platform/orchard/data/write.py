"""Output: Spark writes plain Parquet to a staging folder, a pyarrow pass turns it into the contract.

Spark writes arrays as variable-length LIST; the contract is one ``fixed_size_list<float32>[D]``
column (the layout Ray Data feeds fastest), rows shuffled by seed, and a fixed number of files.
Everything lands in a temporary folder beside the target that is renamed into place when complete,
so a reader never sees half a dataset and a failed prep leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from orchard.data.manifest import FEATURES_COL, GROUP_COL, LABEL_COL, MANIFEST

SPARK_DIR = "_spark"  # Spark's own output inside the staging folder; removed before publishing
QUARANTINE = "quarantine"
QUARANTINE_SCHEMA = pa.schema([("row", pa.int64()), ("reason", pa.string()), ("raw", pa.string())])


def split_schema(feature_dim: int, regression: bool = False, grouped: bool = False) -> pa.Schema:
    label = pa.float32() if regression else pa.int64()
    extra = [(GROUP_COL, pa.string())] if grouped else []
    return pa.schema([(FEATURES_COL, pa.list_(pa.float32(), feature_dim)), (LABEL_COL, label), *extra])


def contract_table(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> pa.Table:
    """In-memory rows (features (n, D), labels (n,), optional group values) as a contract table.

    Labels keep their numpy type: int64 class indices, or a float32 regression target.
    """
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    columns = {FEATURES_COL: pa.FixedSizeListArray.from_arrays(pa.array(flat), x.shape[1]), LABEL_COL: pa.array(y)}
    if groups is not None:
        columns[GROUP_COL] = pa.array([str(g) for g in groups], pa.string())
    return pa.table(columns)


def finish_split(staged: Path, out: Path, feature_dim: int, files: int, regression: bool = False,
                 grouped: bool = False) -> int:
    """Rewrite Spark's output for one split into ``files`` shuffled, fixed-width Parquet files."""
    schema = split_schema(feature_dim, regression, grouped)
    if staged.is_dir():
        table = ds.dataset(str(staged), format="parquet").to_table()
        # The shuffle key is content-derived, so this order is the same however Spark partitioned.
        table = table.sort_by([("_order", "ascending"), (LABEL_COL, "ascending"), ("_rank", "ascending")])
        table = pa.table([table[f.name].cast(f.type) for f in schema], schema=schema)
    else:  # Spark writes no folder for a split without rows (e.g. val = 0)
        table = schema.empty_table()
    write_parts(table, out, files)
    return table.num_rows


def distinct_groups(folder: Path) -> int:
    """How many distinct partition-column values a written split holds."""
    column = ds.dataset(str(folder), format="parquet").to_table(columns=[GROUP_COL])[GROUP_COL]
    return int(pc.count_distinct(column).as_py())


def finish_quarantine(staged: Path, out: Path) -> int:
    table = ds.dataset(str(staged), format="parquet").to_table().sort_by("row")
    write_parts(table.cast(QUARANTINE_SCHEMA), out, 1)
    return table.num_rows


def write_parts(table: pa.Table, out: Path, files: int) -> None:
    # Fewer files than requested when there are fewer rows: no empty files, but at least one file
    # so that an empty split still carries its schema.
    n = max(1, min(files, table.num_rows))
    out.mkdir(parents=True)
    bounds = [i * table.num_rows // n for i in range(n + 1)]
    for i in range(n):
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), out / f"part-{i:05d}.parquet")


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    with open(folder / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")


@contextlib.contextmanager
def staging(target: Path) -> Iterator[Path]:
    """A fresh folder beside ``target``; removed on failure and on success once published."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, target: Path) -> bool:
    """Move the finished folder into place. False if an identical prep got there first."""
    shutil.rmtree(tmp / SPARK_DIR, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        # Same content hash means same content: keep theirs (rename refuses a non-empty target).
        if (target / MANIFEST).is_file():
            return False
        raise
    return True
