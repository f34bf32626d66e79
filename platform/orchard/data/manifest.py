"""The prepared-data contract, readable without Spark.

A prepared dataset is a folder::

    <data.output>/<dataset>-<content_hash>/
        manifest.json
        train/part-*.parquet   val/part-*.parquet   test/part-*.parquet
        quarantine/part-*.parquet        (rows that failed to parse, with row number and reason)

Each split has two columns: ``features`` (fixed_size_list<float32>[feature_dim], already normalized)
and ``label`` (int64 class index into ``manifest["classes"]``). One tensor column is the layout Ray
Data feeds fastest (see STACK_NOTES).

Details the writer guarantees:
- rows in each split are shuffled at prep time (deterministically by ``split.seed``);
- a split has ``files_per_split`` files, fewer when it has fewer rows, and at least one (an empty
  split, e.g. ``val: 0``, is one empty file that still carries the schema);
- ``quarantine/`` has columns ``row`` (1-based data row number, header excluded; for CSV the file's
  line number minus one), ``reason`` and ``raw`` (the CSV line, or the values as JSON), sorted by row;
- ``stats`` are fitted on the train split only and stored as computed ({"mean", "std"} with the
  population std, or {"min", "max"}, or {}); a zero std or range is applied as 1;
- ``counts``: train + val + test + quarantined + duplicates == input;
- with ``federated.partition_by`` (a federated job, ``partition: natural``), each split has a third
  column ``group`` (string: the source column's value) and ``partition_column`` records
  ``{"source": <column>, "column": "group", "distinct": {split: number of distinct values}}``;
  rows with an empty value are quarantined, and rows that differ only in it are not duplicates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
FEATURES_COL = "features"
LABEL_COL = "label"
# Present only when the job partitions by a source column (federated.partition_by): that column's
# value per row, as a string. Not a feature; readers of [features, label] never see it.
GROUP_COL = "group"


@dataclass(frozen=True)
class PreparedData:
    path: Path
    manifest: dict[str, Any]
    reused: bool = False

    def split_path(self, split: str) -> Path:
        return self.path / self.manifest["splits"][split]

    @property
    def quarantined(self) -> int:
        return int(self.manifest["counts"]["quarantined"])


def load_manifest(path: str | Path) -> PreparedData:
    path = Path(path)
    with open(path / MANIFEST) as fh:
        return PreparedData(path=path, manifest=json.load(fh), reused=True)
