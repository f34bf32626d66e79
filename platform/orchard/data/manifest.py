"""The prepared-data contract, readable without Spark.

A prepared dataset is a folder::

    <data.output>/<dataset>-<content_hash>/
        manifest.json
        train/part-*.parquet   val/part-*.parquet   test/part-*.parquet
        quarantine/part-*.parquet        (rows that failed to parse, with row number and reason)

Each split has two columns: ``features`` (fixed_size_list<float32>[feature_dim], already normalized)
and ``label`` (int64 class index into ``manifest["classes"]``, or for ``task: regression`` the float32
target). One tensor column is the layout Ray Data feeds fastest: at 200k rows x 64 floats, 65 scalar
columns fed a TorchTrainer at 44k rows/s (0.07x of in-memory), one fixed-size-list column at 0.6-2.2M rows/s.

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
  rows with an empty value are quarantined, and rows that differ only in it are not duplicates
  (they are kept, in one split);
- rows with equal features always share a split, whatever their label or group (no feature vector is
  in two splits); ``overlap`` counts the kept rows whose features another row also has
  (``shared_features``) and those among them whose labels differ (``conflicting_labels``);
- ``files`` (optional: folders written before it lack it) lists every Parquet file of the folder as
  ``{"path": "train/part-00000.parquet", "bytes": size, "rows": footer row count, "hash":
  "xxh3_128:<hex>"}`` (``blake2b:`` where xxhash is not installed), sorted by path;
- the folder appears complete or not at all (written beside it, then renamed), and ``prepare`` reuses
  it only while ``verify`` finds its files as ``files`` describes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the CLI and the Spark side load this module without them
    import numpy as np
    import pyarrow as pa

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


def slug(text: str, default: str = "data") -> str:
    """``text`` as a folder-name part: lower-case letters and digits, runs of anything else as one dash."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or default


def prepared_folder(output: str | Path, dataset: str, content_hash: str) -> Path:
    """The one place the prepared folder's name is formed: ``<data.output>/<dataset>-<content_hash>``."""
    return Path(output) / f"{dataset}-{content_hash}"


# -- verifying ---------------------------------------------------------------------------------------
# Sizes and footer row counts cost ~0.5 ms for a 56 MB folder; a full xxh3 pass ~10 ms (blake2b ~250 ms,
# sha256 ~350 ms) on this 2-core box, so small folders are hashed by default and big ones on request.

VERIFY_ENV = "ORCHARD_VERIFY_DATA"  # quick: sizes + footer row counts; full: also hashes; auto (default)
HASH_UP_TO = 256 * 2**20  # auto hashes folders up to this many bytes of Parquet


def file_hash(path: str | Path, algorithm: str | None = None) -> str | None:
    """``"<algorithm>:<hex digest>"`` of a file's bytes; None for an algorithm not installed here."""
    if algorithm is None:
        try:
            import xxhash  # noqa: F401
            algorithm = "xxh3_128"
        except ImportError:
            algorithm = "blake2b"
    if algorithm == "xxh3_128":
        try:
            import xxhash
        except ImportError:
            return None
        digest = xxhash.xxh3_128()
    elif algorithm in ("blake2b", "sha256"):
        digest = hashlib.new(algorithm)
    else:
        return None
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return f"{algorithm}:{digest.hexdigest()}"


def verify(prepared: PreparedData, full: bool | None = None) -> list[str]:
    """What in the folder no longer matches the manifest, one line per file; empty when all matches.

    Always checks each listed file's existence, size and Parquet footer row count, and that no
    unlisted Parquet file sits in a split folder; with ``full`` also its hash. ``full=None`` follows
    ``$ORCHARD_VERIFY_DATA`` (``quick``, ``full``, or ``auto``: hash when the files total at most
    ``HASH_UP_TO`` bytes). A manifest without ``files`` gets each split's row count checked instead.
    """
    records = prepared.manifest.get("files")
    if records is None:
        return _verify_counts(prepared)
    problems = []
    if full is None:
        mode = os.environ.get(VERIFY_ENV, "auto")
        full = mode == "full" or (mode == "auto" and sum(int(r["bytes"]) for r in records) <= HASH_UP_TO)
    for record in records:
        problem = _verify_file(prepared.path / record["path"], record, full)
        if problem:
            problems.append(f"{record['path']}: {problem}")
    listed = {r["path"] for r in records}
    folders = {Path(r["path"]).parent.as_posix() for r in records}
    for folder in sorted(folders | set(prepared.manifest.get("splits", {}).values())):
        for f in sorted((prepared.path / folder).glob("*.parquet")):
            if f.relative_to(prepared.path).as_posix() not in listed:
                problems.append(f"{f.relative_to(prepared.path).as_posix()}: not listed in the manifest")
    return problems


def _verify_file(path: Path, record: dict[str, Any], full: bool) -> str | None:
    import pyarrow.parquet as pq

    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{size} bytes, the manifest says {record['bytes']}"
    try:
        rows = pq.read_metadata(path).num_rows
    except Exception as e:  # a torn or overwritten footer: pyarrow's error type varies
        return f"unreadable Parquet footer ({e})"
    if rows != record["rows"]:
        return f"{rows} rows, the manifest says {record['rows']}"
    if full and record.get("hash"):
        algorithm = record["hash"].partition(":")[0]
        got = file_hash(path, algorithm)
        if got is not None and got != record["hash"]:
            return f"content hash {got}, the manifest says {record['hash']}"
    return None


def _verify_counts(prepared: PreparedData) -> list[str]:
    import pyarrow.parquet as pq

    problems = []
    for split in SPLITS:
        files = split_files(prepared, split)
        try:
            rows = sum(pq.read_metadata(f).num_rows for f in files)
        except Exception as e:
            problems.append(f"{split}: unreadable Parquet footer ({e})")
            continue
        if not files or rows != prepared.manifest["counts"][split]:
            problems.append(f"{split}: {len(files)} files with {rows} rows, the manifest counts "
                            f"{prepared.manifest['counts'][split]}")
    return problems


# -- reading -----------------------------------------------------------------------------------------
# Every consumer reads a split through these (Ray Data's feed reads the folder itself, then converts
# its blocks with ``feature_matrix``), so row order, label types and the tensor column mean the same
# thing everywhere.

def split_files(prepared: PreparedData, split: str) -> list[Path]:
    """The split's Parquet files, sorted: row i of the split means the same row to every reader."""
    return parquet_files(prepared.split_path(split))


def parquet_files(path: str | Path) -> list[Path]:
    """A split folder's Parquet files in name order (the order its rows were written in), or ``path``
    itself when it is one file; names starting with ``.`` or ``_`` (a writer's temporaries) are not data."""
    folder = Path(path)
    if folder.is_file():
        return [folder]
    return sorted(f for f in folder.iterdir() if f.suffix == ".parquet" and not f.name.startswith((".", "_")))


def label_dtype(manifest: dict[str, Any]) -> type:
    """Class indices are int64; a regression target is float32 (what the engine's task losses expect)."""
    import numpy as np

    return np.float32 if manifest.get("task") == "regression" else np.int64


def feature_matrix(column: pa.Array | pa.ChunkedArray, copy: bool = True) -> np.ndarray:
    """A ``fixed_size_list<float32>[D]`` column, chunked or sliced or not, as an (n, D) float32 array.

    Each chunk goes through ``flatten()``, which honours a slice's offset. ``.values`` would not: it is
    the whole child array from its first element, so on a slice (a Ray Data block, ``table.slice``, one
    chunk of several) it returns other rows, or too many. With ``copy=False`` a single chunk without
    nulls comes back as a read-only view of Arrow's buffer; otherwise the array is a writable copy
    (``torch.from_numpy`` wants writable memory).
    """
    import numpy as np
    import pyarrow as pa

    dim = column.type.list_size
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    flats = [numbers(chunk.flatten()) for chunk in chunks]
    if not copy and len(flats) == 1:
        return np.asarray(flats[0], dtype=np.float32).reshape(-1, dim)
    flat = np.concatenate(flats) if flats else np.zeros(0, np.float32)  # concatenate copies
    return flat.astype(np.float32, copy=False).reshape(-1, dim)


def numbers(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An integer or float Arrow array as NumPy: a read-only view of its data buffer when it has no nulls.

    Arrow's ``to_numpy`` runs its pandas conversion, whose first use imports pandas (0.5 s and 65 MiB in a
    Flower client or ServerApp that never touches pandas); a null-free number column is just its buffer.
    Chunks are joined (a copy); anything else (nulls, other types) takes Arrow's own conversion.
    """
    import numpy as np
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        if array.num_chunks != 1:
            return np.concatenate([numbers(c) for c in array.chunks]) if array.num_chunks else array.to_numpy()
        array = array.chunk(0)
    kind = "i" if pa.types.is_signed_integer(array.type) else "u" if pa.types.is_unsigned_integer(array.type) \
        else "f" if pa.types.is_floating(array.type) else None
    if kind is None or array.null_count:
        return array.to_numpy(zero_copy_only=False)
    width = array.type.bit_width // 8
    view = np.frombuffer(array.buffers()[1], dtype=f"<{kind}{width}", count=len(array), offset=array.offset * width)
    view.flags.writeable = False  # Arrow's memory, as to_numpy's zero-copy views are
    return view


def _read_table(files: Sequence[Path], columns: list[str]) -> pa.Table | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # ParquetFile, not pq.read_table: that goes through pyarrow.dataset, whose import loads pandas.
    tables = [pq.ParquetFile(f).read(columns=columns) for f in files]
    return pa.concat_tables(tables) if tables else None


def _features(table: pa.Table, feature_dim: int) -> np.ndarray:
    return feature_matrix(table.column(FEATURES_COL)).reshape(-1, feature_dim)


def read_xy(files: Sequence[Path], feature_dim: int, labels_as: type | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, feature_dim) float32 and labels (n,) as ``labels_as`` (default int64), files in the order given."""
    import numpy as np

    labels_as = labels_as or np.int64
    table = _read_table(files, [FEATURES_COL, LABEL_COL])
    if table is None:
        return np.zeros((0, feature_dim), np.float32), np.zeros(0, labels_as)
    return _features(table, feature_dim), np.array(numbers(table.column(LABEL_COL)), dtype=labels_as)


def read_split(prepared: PreparedData, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, feature_dim) float32, labels as ``label_dtype``) of a split, in ``split_files`` order."""
    m = prepared.manifest
    return read_xy(split_files(prepared, split), int(m["feature_dim"]), label_dtype(m))


def read_features(prepared: PreparedData, split: str) -> np.ndarray:
    """A split's features, (n, feature_dim) float32."""
    import numpy as np

    dim = int(prepared.manifest["feature_dim"])
    table = _read_table(split_files(prepared, split), [FEATURES_COL])
    return np.zeros((0, dim), np.float32) if table is None else _features(table, dim)


def read_labels(prepared: PreparedData, split: str) -> np.ndarray:
    """A split's labels as ``label_dtype(manifest)``."""
    import numpy as np

    dtype = label_dtype(prepared.manifest)
    table = _read_table(split_files(prepared, split), [LABEL_COL])
    return np.zeros(0, dtype) if table is None else np.array(numbers(table.column(LABEL_COL)), dtype=dtype)


def read_groups(prepared: PreparedData, split: str) -> np.ndarray | None:
    """The ``group`` column as an object array of strings, in ``read_split``'s row order; None without one."""
    import numpy as np

    if not prepared.manifest.get("partition_column"):
        return None
    table = _read_table(split_files(prepared, split), [GROUP_COL])
    return np.array([] if table is None else table.column(GROUP_COL).to_pylist(), dtype=object)


def read_head(prepared: PreparedData, split: str, rows: int) -> np.ndarray:
    """The features of a split's first ``rows`` rows (fewer if it has fewer), reading no more than needed."""
    import numpy as np
    import pyarrow.parquet as pq

    dim = int(prepared.manifest["feature_dim"])
    pieces, need = [np.zeros((0, dim), np.float32)], rows
    for f in split_files(prepared, split):
        if need <= 0:
            break
        batches = pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=max(rows, 1), columns=[FEATURES_COL])
        while need > 0 and (batch := next(batches, None)) is not None:
            pieces.append(feature_matrix(batch.column(FEATURES_COL))[:need].reshape(-1, dim))
            need -= len(pieces[-1])
    return np.concatenate(pieces)
