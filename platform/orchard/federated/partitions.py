"""Dividing the training split among clients, once, and reading one client's share.

Partitions are computed on the driver from the train split's labels (deterministic by ``federated.seed``)
and written as one Parquet file per client, in the prepared folder's two-column layout. A client opens
only its own file, as a real SuperNode would hold only its own data. The folder name carries every knob
that shapes the result, and the prepared folder is keyed by content hash, so a folder that exists is
reused as is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchard.config import FederatedSpec
from orchard.data.manifest import FEATURES_COL, LABEL_COL, PreparedData

PARTITIONS_DIR = "partitions"
META_FILE = "partitions.json"
# Bumped whenever the algorithm changes, so folders written by an older version are not reused.
ALGORITHM_VERSION = 1
MIN_PARTITION_SIZE = 10
MAX_DIRICHLET_TRIES = 100


class PartitionError(ValueError):
    """The training split cannot be divided as the spec asks."""


@dataclass(frozen=True)
class PartitionSet:
    folder: Path
    counts: list[int]
    label_counts: list[list[int]]  # [client][class]: shows the label skew a Dirichlet split produced

    def client_file(self, client: int) -> Path:
        return client_file(self.folder, client)


def client_file(folder: Path, client: int) -> Path:
    return Path(folder) / f"client-{client}.parquet"


def partition_name(fed: FederatedSpec) -> str:
    alpha = f"-a{fed.alpha:g}" if fed.partition == "dirichlet" else ""
    return f"{fed.partition}{alpha}-n{fed.clients}-s{fed.seed}"


# -- reading -----------------------------------------------------------------------------------------

def label_dtype(manifest: dict) -> type:
    """Class indices are int64; a regression target is float32 (what the engine's task losses expect)."""
    return np.float32 if manifest.get("task") == "regression" else np.int64


def read_xy(files: list[Path], feature_dim: int, labels_as: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, D] float32 and labels [N] from Parquet files, in the order given."""
    tables = [pq.read_table(f, columns=[FEATURES_COL, LABEL_COL]) for f in files]
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        return np.zeros((0, feature_dim), np.float32), np.zeros(0, labels_as)
    # flatten() honours slice offsets, unlike .values on a sliced list array.
    flat = table.column(FEATURES_COL).combine_chunks().flatten()
    # np.array copies: Arrow's buffers are read-only, and torch.from_numpy wants writable memory.
    x = np.array(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, feature_dim)
    y = np.array(table.column(LABEL_COL).to_numpy(), dtype=labels_as)
    return x, y


def split_files(prepared: PreparedData, split: str) -> list[Path]:
    # Sorted, so row i of the split means the same row to every reader.
    return sorted(prepared.split_path(split).glob("*.parquet"))


def read_split(prepared: PreparedData, split: str) -> tuple[np.ndarray, np.ndarray]:
    m = prepared.manifest
    return read_xy(split_files(prepared, split), int(m["feature_dim"]), label_dtype(m))


# -- dividing ----------------------------------------------------------------------------------------

def iid_indices(num_rows: int, clients: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(num_rows)
    return [np.sort(part) for part in np.array_split(order, clients)]


def dirichlet_indices(labels: np.ndarray, clients: int, alpha: float, seed: int,
                      min_size: int = MIN_PARTITION_SIZE) -> list[np.ndarray]:
    """Per class, shares drawn from Dir(alpha); redrawn until every client has ``min_size`` rows.

    The same rule as flwr-datasets' DirichletPartitioner(min_partition_size=...): redrawing keeps the
    label skew a pure Dirichlet draw, where topping up small clients would blur it.
    """
    min_size = min(min_size, len(labels) // clients)
    if min_size < 1:
        raise PartitionError(f"federated.clients={clients}: the training split has only {len(labels)} rows")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in classes:
            rows = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(rows)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(rows, cuts)):
                parts[i].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise PartitionError(
        f"federated.alpha={alpha:g}: no Dirichlet draw in {MAX_DIRICHLET_TRIES} gave each of "
        f"{clients} clients at least {min_size} rows; raise federated.alpha or lower federated.clients")


def partition_indices(labels: np.ndarray, fed: FederatedSpec) -> list[np.ndarray]:
    if fed.clients > len(labels):
        raise PartitionError(f"federated.clients={fed.clients} exceeds the {len(labels)} training rows")
    if fed.partition == "iid":
        return iid_indices(len(labels), fed.clients, fed.seed)
    if not np.issubdtype(labels.dtype, np.integer):
        raise PartitionError("federated.partition=dirichlet skews class labels; a regression target has none "
                             "(use partition: iid)")
    return dirichlet_indices(labels, fed.clients, fed.alpha, fed.seed)


# -- writing -----------------------------------------------------------------------------------------

def _table(x: np.ndarray, y: np.ndarray) -> pa.Table:
    features = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])
    return pa.table({FEATURES_COL: features, LABEL_COL: pa.array(y, pa.int64())})


def _params(fed: FederatedSpec) -> dict:
    return {"version": ALGORITHM_VERSION, "scheme": fed.partition, "alpha": fed.alpha, "clients": fed.clients,
            "seed": fed.seed, "min_partition_size": MIN_PARTITION_SIZE}


def _existing(folder: Path, fed: FederatedSpec) -> PartitionSet | None:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if any(meta.get(k) != v for k, v in _params(fed).items()):
        return None
    if not all(client_file(folder, i).is_file() for i in range(fed.clients)):
        return None
    return PartitionSet(folder, [int(c) for c in meta["counts"]], meta["label_counts"])


def _label_counts(y: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[list[int]]:
    if not np.issubdtype(y.dtype, np.integer):
        return []  # regression: no classes to count
    return [np.bincount(y[rows], minlength=num_classes).tolist() for rows in parts]


def _publish(tmp: Path, folder: Path, fed: FederatedSpec) -> None:
    """Move a finished folder into place; if another process won the race, keep theirs."""
    if folder.exists() and _existing(folder, fed) is None:
        shutil.rmtree(folder)  # stale: written by an older algorithm version, or incomplete
    try:
        os.replace(tmp, folder)
    except OSError:
        if _existing(folder, fed) is None:
            raise


def write_partitions(prepared: PreparedData, fed: FederatedSpec) -> PartitionSet:
    """Each client's rows of the train split in ``partitions/<name>/client-<i>.parquet`` (reused if present)."""
    folder = prepared.path / PARTITIONS_DIR / partition_name(fed)
    found = _existing(folder, fed)
    if found is not None:
        return found
    x, y = read_split(prepared, "train")
    parts = partition_indices(y, fed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed into place, so a reader never sees half a partition set.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for i, rows in enumerate(parts):
            pq.write_table(_table(x[rows], y[rows]), client_file(tmp, i))
        counts = [int(len(rows)) for rows in parts]
        labels = _label_counts(y, parts, int(prepared.manifest.get("num_classes") or 0))
        (tmp / META_FILE).write_text(json.dumps({**_params(fed), "counts": counts, "label_counts": labels}))
        _publish(tmp, folder, fed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PartitionSet(folder, counts, labels)
