"""Helpers for the data tests: a prepared split's rows as a set, (malformed) CSV files."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from orchard.data import PreparedData
from orchard.data.manifest import read_split


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
