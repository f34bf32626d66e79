"""Helpers for the data tests: read a prepared split back, write (malformed) CSV files."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds

from orchard.data import PreparedData


def read_split(prepared: PreparedData, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, D] float32, labels [n] int64) in file order."""
    files = sorted(prepared.split_path(split).glob("part-*.parquet"))
    table = ds.dataset([str(f) for f in files], format="parquet").to_table()
    dim = prepared.manifest["feature_dim"]
    flat = table["features"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, dim), table["label"].to_numpy()


def row_set(prepared: PreparedData, split: str) -> set[tuple]:
    x, y = read_split(prepared, split)
    return {(*row.tolist(), int(label)) for row, label in zip(x, y, strict=True)}


def write_csv(path: Path, header: list[str], rows: list[list[Any]] | list[str]) -> Path:
    """Rows given as lists are CSV-encoded; rows given as strings are written verbatim (malformed on purpose)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            if isinstance(row, str):
                fh.write(row + "\n")
            else:
                writer.writerow(row)
    return path
