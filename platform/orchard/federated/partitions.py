"""Dividing the training split among clients, once, and reading one client's share.

Partitions are computed on the driver from the train split's labels (deterministic by ``federated.seed``)
and written as one Parquet file per client, in the prepared folder's two-column layout (plus the
``group`` column for natural partitions). A client opens only its own file, as a real SuperNode would
hold only its own data. The folder name carries every knob that shapes the result, and the prepared
folder is keyed by content hash, so a folder that exists is reused as is.

Schemes: ``iid`` and ``dirichlet`` (hand-written, see below), ``pathological`` (flwr-datasets'
PathologicalPartitioner), ``shard`` (hand-written: McMahan et al.'s label-sorted shards) and ``natural``
(flwr-datasets' NaturalIdPartitioner over the prepared ``group`` column). Every scheme puts every
training row in exactly one client, and no client is left empty; a spec that cannot meet that is
refused with a ``PartitionError`` naming the key. flwr-datasets is imported only when used.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from orchard.config import FederatedSpec
from orchard.data.manifest import GROUP_COL, LABEL_COL, PreparedData, read_groups, read_split, slug
from orchard.data.write import contract_table
from orchard.results import PartitionTable

PARTITIONS_DIR = "partitions"
META_FILE = "partitions.json"
# Bumped whenever the algorithm changes, so folders written by an older version are not reused.
# (Schemes computed by flwr-datasets also record its version: an upgrade may change their output.)
ALGORITHM_VERSION = 1
MAX_DIRICHLET_TRIES = 100


class PartitionError(ValueError):
    """The training split cannot be divided as the spec asks."""


@dataclass(frozen=True)
class PartitionSet:
    folder: Path
    counts: list[int]
    label_counts: list[list[int]]  # [client][class]: shows the label skew a Dirichlet split produced
    ids: list[str] | None = None  # natural: the partition_by value each client holds (client i = ids[i])

    def client_file(self, client: int) -> Path:
        return client_file(self.folder, client)


def client_file(folder: Path, client: int) -> Path:
    return Path(folder) / f"client-{client}.parquet"


def partition_name(fed: FederatedSpec) -> str:
    if fed.partition == "natural":  # no randomness: the seed does not shape it
        return f"natural-{slug(fed.partition_by or '', 'column')}-n{fed.clients}"
    knob = {"dirichlet": f"-a{fed.alpha:g}", "pathological": f"-k{fed.classes_per_client}",
            "shard": f"-h{fed.shards_per_client}"}.get(fed.partition, "")
    return f"{fed.partition}{knob}-n{fed.clients}-s{fed.seed}"


# -- reading -----------------------------------------------------------------------------------------

def natural_groups(prepared: PreparedData, split: str, partition_by: str) -> np.ndarray:
    """The ``group`` column (each row's ``partition_by`` value), refused unless prepared from that column."""
    carried = (prepared.manifest.get("partition_column") or {}).get("source")
    groups = read_groups(prepared, split)
    if carried != partition_by or groups is None:
        has = f"carries {carried!r}" if carried else "has no partition column"
        raise PartitionError(
            f"federated.partition_by={partition_by!r}: the prepared data at {prepared.path} {has}; prepare it "
            "from a federated spec with partition: natural and this partition_by")
    return groups


# -- dividing ----------------------------------------------------------------------------------------
# iid and dirichlet stay hand-written: flwr-datasets' IidPartitioner cuts contiguous blocks without a
# seed (federated.seed would mean nothing), and both are tested, deterministic and already on disk in
# users' prepared folders; swapping them in would redraw every existing partition for no gain.

def iid_indices(num_rows: int, clients: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(num_rows)
    return [np.sort(part) for part in np.array_split(order, clients)]


def dirichlet_indices(labels: np.ndarray, clients: int, alpha: float, seed: int,
                      min_size: int = 2) -> list[np.ndarray]:
    """Per class, shares drawn from Dir(alpha); redrawn until every client has ``min_size`` rows.

    The same rule as flwr-datasets' DirichletPartitioner(min_partition_size=...): redrawing keeps the
    label skew a pure Dirichlet draw, where topping up small clients would blur it.
    """
    if min_size * clients > len(labels):
        raise PartitionError(f"federated.min_partition_rows={min_size}: {clients} clients x {min_size} rows exceeds "
                             f"the {len(labels)} training rows; lower federated.min_partition_rows or federated.clients")
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
        f"{clients} clients at least {min_size} rows (federated.min_partition_rows); lower "
        "federated.min_partition_rows, raise federated.alpha or lower federated.clients")


def shard_indices(labels: np.ndarray, clients: int, per_client: int, seed: int) -> list[np.ndarray]:
    """Sort by label, cut into ``clients * per_client`` shards, deal each client ``per_client`` at random.

    Hand-written rather than flwr-datasets' ShardPartitioner, which cuts equal shards of
    floor(rows / shards) and drops the remainder (up to shards - 1 training rows lost): here shard
    sizes differ by at most one row and every row lands in exactly one client.
    """
    shards = clients * per_client
    if shards > len(labels):
        raise PartitionError(
            f"federated.shards_per_client={per_client}: {clients} clients x {per_client} shards = {shards} "
            f"shards, but the training split has only {len(labels)} rows; lower either")
    rng = np.random.default_rng(seed)
    # Ties within a label in a seeded order, so a shard is a random sample of its class, not a prefix.
    order = np.lexsort((rng.permutation(len(labels)), labels))
    pieces = np.array_split(order, shards)
    dealt = rng.permutation(shards).reshape(clients, per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]


def _flwr_indices(partitioner, columns: dict[str, np.ndarray], clients: int) -> list[np.ndarray]:
    """Row indices of each of ``clients`` partitions of an in-memory table (no download, no cache files)."""
    from datasets import Dataset

    n = len(next(iter(columns.values())))
    partitioner.dataset = Dataset.from_dict({"_idx": np.arange(n), **columns})
    # NaturalIdPartitioner draws a tqdm bar on stderr; a partition is one quick step, not a progress story.
    with contextlib.redirect_stderr(io.StringIO()):
        return [np.sort(np.asarray(partitioner.load_partition(i)["_idx"], dtype=np.int64)) for i in range(clients)]


def pathological_indices(labels: np.ndarray, clients: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` classes per client, each class's rows split evenly among the clients holding it."""
    classes = np.unique(labels)
    if k > len(classes):
        raise PartitionError(
            f"federated.classes_per_client={k} exceeds the {len(classes)} classes of the training split")
    from flwr_datasets.partitioner import PathologicalPartitioner

    # first-deterministic (the paper's): client i surely holds class i % C, so with clients >= classes
    # every class, hence every row, goes to some client.
    partitioner = PathologicalPartitioner(num_partitions=clients, partition_by=LABEL_COL, num_classes_per_partition=k,
                                          class_assignment_mode="first-deterministic", shuffle=False, seed=seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # unused classes: refused below, in our words
            parts = _flwr_indices(partitioner, {LABEL_COL: labels}, clients)
    except ValueError as exc:  # a class held by more clients than it has rows
        raise PartitionError(f"federated.classes_per_client={k} with federated.clients={clients}: {exc}") from None
    held = np.zeros(len(labels), bool)
    for rows in parts:
        held[rows] = True
    if not held.all():
        lost = sorted(int(c) for c in np.unique(labels[~held]))
        raise PartitionError(
            f"federated.classes_per_client={k} with federated.clients={clients}: classes {lost} went to no "
            f"client, so {int((~held).sum())} training rows would be lost; use federated.clients >= "
            f"{len(classes)}, or more classes_per_client (or another federated.seed)")
    return parts


def natural_indices(groups: np.ndarray, clients: int, column: str) -> tuple[list[np.ndarray], list[str]]:
    """One client per distinct ``partition_by`` value (sorted: client i holds the i-th id)."""
    ids = sorted(set(groups.tolist()))
    if len(ids) != clients:
        # One SuperNode per site/user is the point of a natural partition: no merging or splitting ids.
        shown = ", ".join(map(repr, ids[:10])) + (", …" if len(ids) > 10 else "")
        raise PartitionError(
            f"federated.clients={clients}, but federated.partition_by column {column!r} has {len(ids)} "
            f"distinct values in the training split ({shown}); set federated.clients: {len(ids)}")
    from flwr_datasets.partitioner import NaturalIdPartitioner

    partitioner = NaturalIdPartitioner(partition_by=GROUP_COL)
    parts = _flwr_indices(partitioner, {GROUP_COL: groups}, clients)
    return parts, [str(partitioner.partition_id_to_natural_id[i]) for i in range(clients)]


def _classes_only(labels: np.ndarray, scheme: str) -> None:
    if not np.issubdtype(labels.dtype, np.integer):
        raise PartitionError(f"federated.partition={scheme} skews class labels; a regression target has none "
                             "(use partition: iid)")


def partition_indices(labels: np.ndarray, fed: FederatedSpec, groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Each client's row indices into the training split (``groups``: the natural ids, for natural)."""
    return _divide(labels, fed, groups)[0]


def _divide(labels: np.ndarray, fed: FederatedSpec,
            groups: np.ndarray | None) -> tuple[list[np.ndarray], list[str] | None]:
    if fed.clients > len(labels):
        raise PartitionError(f"federated.clients={fed.clients} exceeds the {len(labels)} training rows")
    ids = None
    if fed.partition == "iid":
        parts = iid_indices(len(labels), fed.clients, fed.seed)
    elif fed.partition == "shard":
        parts = shard_indices(labels, fed.clients, fed.shards_per_client, fed.seed)
    elif fed.partition == "natural":
        if groups is None:
            raise PartitionError("federated.partition=natural needs each row's federated.partition_by value")
        parts, ids = natural_indices(groups, fed.clients, fed.partition_by or GROUP_COL)
    else:
        _classes_only(labels, fed.partition)
        if fed.partition == "dirichlet":
            parts = dirichlet_indices(labels, fed.clients, fed.alpha, fed.seed, fed.min_partition_rows)
        else:
            parts = pathological_indices(labels, fed.clients, fed.classes_per_client, fed.seed)
    _check_cover(parts, len(labels), fed)
    return parts, ids


def _check_cover(parts: list[np.ndarray], num_rows: int, fed: FederatedSpec) -> None:
    """Every row in exactly one client and no client empty: what every scheme promises."""
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise PartitionError(f"federated.partition={fed.partition}: client(s) {empty[:10]} would get no rows; "
                             "lower federated.clients")
    seen = np.bincount(np.concatenate(parts), minlength=num_rows)
    if len(parts) != fed.clients or len(seen) != num_rows or not (seen == 1).all():
        raise RuntimeError(f"partition {fed.partition} is not an exact cover of the {num_rows} training rows")  # a bug


# -- writing -----------------------------------------------------------------------------------------

def _params(fed: FederatedSpec) -> dict:
    params = {"version": ALGORITHM_VERSION, "scheme": fed.partition, "clients": fed.clients}
    extra = {
        "iid": {"seed": fed.seed},
        "dirichlet": {"seed": fed.seed, "alpha": fed.alpha, "min_partition_size": fed.min_partition_rows},
        "shard": {"seed": fed.seed, "shards_per_client": fed.shards_per_client},
        "pathological": {"seed": fed.seed, "classes_per_client": fed.classes_per_client,
                         "assignment": "first-deterministic", "library": _flwr_datasets_version()},
        "natural": {"partition_by": fed.partition_by, "library": _flwr_datasets_version()},
    }[fed.partition]
    return {**params, **extra}


def _flwr_datasets_version() -> str:
    from importlib.metadata import version  # the installed version, without importing datasets

    return f"flwr-datasets {version('flwr-datasets')}"


def _existing(folder: Path, fed: FederatedSpec) -> PartitionSet | None:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if any(meta.get(k) != v for k, v in _params(fed).items()):
        return None
    if not all(client_file(folder, i).is_file() for i in range(fed.clients)):
        return None
    return PartitionSet(folder, [int(c) for c in meta["counts"]], meta["label_counts"], meta.get("ids"))


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
    groups = natural_groups(prepared, "train", fed.partition_by) if fed.partition == "natural" else None
    parts, ids = _divide(y, fed, groups)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed into place, so a reader never sees half a partition set.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for i, rows in enumerate(parts):
            pq.write_table(contract_table(x[rows], y[rows], None if groups is None else groups[rows]), client_file(tmp, i))
        counts = [int(len(rows)) for rows in parts]
        labels = _label_counts(y, parts, int(prepared.manifest.get("num_classes") or 0))
        meta = {**_params(fed), "counts": counts, "label_counts": labels, "ids": ids}
        (tmp / META_FILE).write_text(json.dumps(meta))
        _publish(tmp, folder, fed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PartitionSet(folder, counts, labels, ids)


# -- each client's share of the validation split (federated.client_eval) ---------------------------------

VAL_DIR = "val"  # <partition folder>/val/client-<i>.parquet


def val_indices(labels: np.ndarray, parts: PartitionSet, seed: int,
                groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Each client's rows of the validation split, drawn with the label mix of its training rows.

    A client's local validation data should look like its local data, so per class the validation rows
    are dealt out in proportion to the clients' training rows of that class (a Dirichlet client holding no
    class-3 rows gets no class-3 validation rows). Natural partitions keep each row with its own id;
    a regression target is dealt in proportion to training rows. Some clients may get none.
    """
    if parts.ids is not None and groups is not None:
        return [np.flatnonzero(groups == cid) for cid in parts.ids]
    rng = np.random.default_rng(seed + 7919)
    counts = np.asarray(parts.counts, dtype=np.float64)
    if not parts.label_counts or not np.issubdtype(labels.dtype, np.integer):
        groups_of = {None: np.arange(len(labels))}
        weights = {None: counts}
    else:
        lc = np.asarray(parts.label_counts, dtype=np.float64)
        groups_of = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        weights = {c: lc[:, c] if c < lc.shape[1] and lc[:, c].sum() > 0 else counts for c in groups_of}
    out: list[list[np.ndarray]] = [[] for _ in counts]
    for key, rows in groups_of.items():
        rows = rng.permutation(rows)
        share = np.cumsum(weights[key]) / weights[key].sum()
        for i, chunk in enumerate(np.split(rows, (share * len(rows)).astype(int)[:-1])):
            out[i].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in out]


def write_val_partitions(prepared: PreparedData, fed: FederatedSpec, parts: PartitionSet) -> Path:
    """``<partition folder>/val/client-<i>.parquet``, once: what each client evaluates the global model on."""
    folder = parts.folder / VAL_DIR
    if (folder / META_FILE).is_file() and all(client_file(folder, i).is_file() for i in range(fed.clients)):
        return folder
    x, y = read_split(prepared, "val")
    groups = natural_groups(prepared, "val", fed.partition_by) if fed.partition == "natural" else None
    rows_of = val_indices(y, parts, fed.seed, groups)
    tmp = Path(tempfile.mkdtemp(prefix=".val-", dir=parts.folder))
    try:
        for i, rows in enumerate(rows_of):
            pq.write_table(contract_table(x[rows], y[rows], None if groups is None else groups[rows]), client_file(tmp, i))
        (tmp / META_FILE).write_text(json.dumps({"counts": [int(len(r)) for r in rows_of]}))
        if folder.exists() and not (folder / META_FILE).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # left incomplete by a killed writer
        with contextlib.suppress(OSError):  # another process published the same folder first
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def partition_table(partitions: PartitionSet, classes: list | None = None) -> dict[str, list]:
    """Columns ``client``, ``rows``, (natural) ``id``, then ``class <c>`` per class: for ``log_table``."""
    n = len(partitions.counts)
    table: dict[str, list] = {"client": list(range(n)), "rows": list(partitions.counts)}
    if partitions.ids is not None:
        table["id"] = list(partitions.ids)
    if partitions.label_counts:
        width = len(partitions.label_counts[0])
        names = list(classes) if classes is not None and len(classes) == width else list(range(width))
        for j, name in enumerate(names):
            table[f"class {name}"] = [int(row[j]) for row in partitions.label_counts]
    return table


def partition_summary(partitions: PartitionSet, classes: list | None = None) -> PartitionTable:
    """The partition set as plain data for tracking: ``partition_table`` as columns + rows, and the counts."""
    table = partition_table(partitions, classes)
    columns = list(table)
    width = len(partitions.label_counts[0]) if partitions.label_counts else 0
    names = list(classes) if classes is not None and len(classes) == width else list(range(width))
    return PartitionTable(columns=columns, rows=[list(row) for row in zip(*table.values(), strict=True)],
                          counts=list(partitions.counts), label_counts=[list(r) for r in partitions.label_counts],
                          classes=names, name=partitions.folder.name)
