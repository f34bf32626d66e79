"""Output: Spark writes plain Parquet to a staging folder, a pyarrow pass turns it into the contract.

Spark writes each split already shuffled by seed, one file per range of the shuffle key; Spark writes
arrays as variable-length LIST, and the contract is one ``fixed_size_list<float32>[D]`` column (the
layout Ray Data feeds fastest), so a streaming pyarrow pass rewrites each file's batches.
Everything lands in a temporary folder beside the target that is renamed into place when complete,
so a reader never sees half a dataset and a failed prep leaves nothing behind. A prep killed outright
(SIGKILL, power loss) leaves only a staging folder whose owner lock nobody holds; ``sweep`` removes it.
One prep per target at a time: ``exclusive`` holds ``<target>.lock`` (``fcntl.flock``, released by the
kernel when its process dies, so a dead prep never blocks the next one).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchard.data.manifest import FEATURES_COL, GROUP_COL, LABEL_COL, MANIFEST, file_hash

log = logging.getLogger("orchard.data")

SPARK_DIR = "_spark"  # Spark's own output inside the staging folder; removed before publishing
OWNER = ".owner"  # in a staging folder: flock-ed by the process writing it, with its pid
QUARANTINE = "quarantine"
ROW_GROUP_ROWS = 65_536  # rows per Parquet row group of a written split
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
    columns = {FEATURES_COL: pa.FixedSizeListArray.from_arrays(_as_arrow(flat), x.shape[1]), LABEL_COL: _as_arrow(y)}
    if groups is not None:
        columns[GROUP_COL] = pa.array([str(g) for g in groups], pa.string())
    return pa.Table.from_arrays(list(columns.values()), names=list(columns))


def _as_arrow(values: np.ndarray) -> pa.Array:
    """A 1-D number array as an Arrow array over the same memory. ``pa.array`` and ``pa.table`` would do,
    but their first call imports pandas (0.5 s, 65 MiB), which the ServerApp writing partitions never uses."""
    values = np.ascontiguousarray(values)
    if values.dtype.kind not in "iuf":  # Arrow packs booleans into bits; other kinds have no plain buffer
        return pa.array(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def finish_split(staged: Path, out: Path, feature_dim: int, files: int, regression: bool = False,
                 grouped: bool = False) -> int:
    """Rewrite Spark's files for one split (in shuffle order when read in name order) into ``files``
    contract files of equal row counts (fewer when there are fewer rows, at least one).

    Batch by batch, so memory stays bounded whatever the split's size.
    """
    schema = split_schema(feature_dim, regression, grouped)
    # pre_buffer=False: with pyarrow's default, iter_batches pre-buffers every row group of a file and keeps
    # them until the file is done, so the driver held a whole staged train file (4.7 GiB at 50M rows).
    sources = ([pq.ParquetFile(f, pre_buffer=False) for f in sorted(staged.glob("part-*.parquet"))]
               if staged.is_dir() else [])
    total = sum(f.metadata.num_rows for f in sources)
    out.mkdir(parents=True)
    n = max(1, min(files, total))
    bounds = [i * total // n for i in range(1, n + 1)]  # the row count after each output file
    index, written = 0, 0
    sink = pq.ParquetWriter(out / "part-00000.parquet", schema)
    try:
        for source in sources:
            for batch in source.iter_batches(batch_size=ROW_GROUP_ROWS):
                batch = _contract_batch(batch, schema, feature_dim)
                while batch.num_rows:
                    take = min(batch.num_rows, bounds[index] - written)
                    if not take and index + 1 == n:  # more rows than the metadata said: never silently
                        raise RuntimeError(f"{staged} holds more rows than its files' metadata ({total})")
                    if take:
                        sink.write_batch(batch.slice(0, take))
                        written += take
                        batch = batch.slice(take)
                    if written == bounds[index] and index + 1 < n:
                        sink.close()
                        index += 1
                        sink = pq.ParquetWriter(out / f"part-{index:05d}.parquet", schema)
    finally:
        sink.close()
    return written


def _contract_batch(batch: pa.RecordBatch, schema: pa.Schema, feature_dim: int) -> pa.RecordBatch:
    # Spark's rows carry the features packed (float32, little-endian; see rowparse.Scaler).
    packed = batch.column(FEATURES_COL)
    n = len(packed)
    _, offsets, data = packed.buffers()
    start = int(np.frombuffer(offsets, np.int32, count=1, offset=packed.offset * 4)[0]) if n else 0
    flat = np.frombuffer(data, "<f4", count=n * feature_dim, offset=start) if n else np.zeros(0, np.float32)
    columns = [pa.FixedSizeListArray.from_arrays(pa.array(flat), feature_dim)]
    columns += [batch.column(f.name).cast(f.type) for f in list(schema)[1:]]  # drops the carried split
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def distinct_groups(folder: Path) -> int:
    """How many distinct partition-column values a written split holds."""
    import pyarrow.dataset as ds  # here: it imports pandas (~40 MiB), which a Flower client never needs

    column = ds.dataset(str(folder), format="parquet").to_table(columns=[GROUP_COL])[GROUP_COL]
    return int(pc.count_distinct(column).as_py())


def finish_quarantine(staged: Path, out: Path) -> int:
    import pyarrow.dataset as ds

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


def file_records(folder: Path) -> list[dict[str, Any]]:
    """Every Parquet file of a finished folder (splits, quarantine) as the manifest's ``files`` entries."""
    records = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != SPARK_DIR):
        for f in sorted(sub.glob("*.parquet")):
            records.append({"path": f.relative_to(folder).as_posix(), "bytes": f.stat().st_size,
                            "rows": pq.read_metadata(f).num_rows, "hash": file_hash(f)})
    return records


@contextlib.contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """Hold ``<target>.lock`` while preparing ``target``: a second prep of the same data waits here.

    The holder unlinks the file before releasing it (nothing is left beside the dataset); a waiter
    that then gets the lock on the unlinked file notices (the path no longer names its file) and retries.
    """
    lock = target.with_name(target.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                log.info("waiting for another prep of the same data (%s) to finish", _holder(fd) or lock)
                waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        _claim(fd)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def staging(target: Path) -> Iterator[Path]:
    """A fresh folder beside ``target``, owned (flock on ``.owner``) by this process while it writes.

    Removed on failure and on success once published; if the process is killed, the kernel releases
    the owner lock and the next ``sweep`` removes the folder.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    fd = os.open(tmp / OWNER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _claim(fd)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def sweep(target: Path) -> list[Path]:
    """Remove what dead preps of ``target`` left beside it (staging folders, folders moved aside).

    A staging folder whose owner lock is still held belongs to a live prep and is kept. Returns the
    folders removed.
    """
    removed = []
    for leftover in sorted(target.parent.glob(f".{target.name}.*")):
        if not leftover.is_dir() or (".tmp-" not in leftover.name and ".bad-" not in leftover.name):
            continue
        if _owned(leftover / OWNER):
            continue
        log.info("removing %s, left by a prep that did not finish", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    return removed


def discard(target: Path) -> None:
    """Move a bad prepared folder out of the way in one rename (readers then find nothing), then delete it."""
    aside = target.with_name(f".{target.name}.bad-{uuid.uuid4().hex[:8]}")
    log.warning("moving %s aside to %s and preparing it again", target, aside.name)
    os.replace(target, aside)
    shutil.rmtree(aside, ignore_errors=True)


def publish(tmp: Path, target: Path) -> bool:
    """Move the finished folder into place. False if an identical prep got there first."""
    shutil.rmtree(tmp / SPARK_DIR, ignore_errors=True)
    (tmp / OWNER).unlink(missing_ok=True)  # the lock stays held on the open file until staging ends
    try:
        os.replace(tmp, target)
    except OSError:
        # Same content hash means same content: keep theirs (rename refuses a non-empty target).
        if (target / MANIFEST).is_file():
            return False
        raise
    return True


def _claim(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)


def _holder(fd: int) -> str:
    return os.pread(fd, 200, 0).decode(errors="replace").strip()


def _owned(owner: Path) -> bool:
    """Whether a live process holds ``owner``'s lock (False when the file is missing)."""
    try:
        fd = os.open(owner, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
