"""The prepared-data contract, readable without Spark.

A prepared dataset is a folder::

    <data.output>/<dataset>-<content_hash>/
        manifest.json
        train/part-*.parquet   val/part-*.parquet   test/part-*.parquet
        quarantine/part-*.parquet        (rows that failed to parse, with row number and reason)

Each split has two columns: ``features`` (fixed_size_list<float32>[feature_dim], already normalized)
and ``label`` (int64 class index into ``manifest["classes"]``). One tensor column is the layout Ray
Data feeds fastest (see STACK_NOTES).
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
