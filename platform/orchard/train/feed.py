"""Ray Data → (features, label) tensors, the way that keeps a training step fed on a small CPU budget.

Measured here (2 cores, MLP, batch 256): ``iter_torch_batches`` fed 0.62× of in-memory speed. Taking
whole Arrow blocks, viewing the fixed-size-list column as one float32 matrix without a copy and slicing
it, from a split kept in the object store, fed 0.87–0.91×. Shuffling the block order here instead of with
``randomize_block_order`` (an all-to-all barrier planned and executed again every epoch, ~30 ms, and one
that holds a whole streamed split) fed 0.99×. A prefetch thread only competes with the step for the GIL
on the CPU; on a GPU one block of prefetch overlaps reading with the device's work.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from ray.train import DataConfig

from orchard.data.manifest import FEATURES_COL, LABEL_COL, feature_matrix, numbers

# Blocks held back to shuffle their order: the whole split when it is smaller, else a sliding window.
SHUFFLE_WINDOW_BYTES = 256 << 20


def tensor_batches(it, batch_size: int, label_dtype: torch.dtype = torch.int64,
                   pin: bool = False, rng: np.random.Generator | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches from a Ray Data iterator/dataset (a rank's own shard: see ``ShardConfig``).

    Whole blocks are taken as Ray Data stores them (``batch_size=None``): re-batching to a fixed row
    count would concatenate across block edges, a copy of every row. Batches are views into a block;
    only the rows left at a block's end are copied, joined with the next block's first rows, so every
    batch but the last has ``batch_size`` rows and ranks step in lockstep.

    With ``rng`` the block order is shuffled (rows inside blocks were shuffled at prep time): a fresh
    order on every call, drawn from ``rng``, over windows of ``SHUFFLE_WINDOW_BYTES``.
    """
    blocks = it.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1 if pin else 0)
    if rng is not None:
        blocks = _shuffled(blocks, rng, SHUFFLE_WINDOW_BYTES)
    carry: tuple[torch.Tensor, torch.Tensor] | None = None
    for block in blocks:
        x, y = _as_tensors(block, label_dtype)
        if carry is not None:
            need = batch_size - len(carry[1])
            x_head, y_head = torch.cat([carry[0], x[:need]]), torch.cat([carry[1], y[:need]])
            x, y = x[need:], y[need:]
            carry = (x_head, y_head)
            if len(y_head) < batch_size:
                continue
            yield _pinned(x_head, y_head, pin)
            carry = None
        full = len(y) - len(y) % batch_size
        for start in range(0, full, batch_size):
            yield _pinned(x[start : start + batch_size], y[start : start + batch_size], pin)
        if full < len(y):
            carry = (x[full:], y[full:])
    if carry is not None:
        yield _pinned(*carry, pin)


def _shuffled(blocks: Iterator, rng: np.random.Generator, window_bytes: int) -> Iterator:
    """``blocks`` in random order: a block leaves a buffer of about ``window_bytes`` at a random slot."""
    buf: list = []
    held = 0
    for block in blocks:
        buf.append(block)
        held += block.nbytes
        while held > window_bytes and len(buf) > 1:
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            out = buf.pop()
            held -= out.nbytes
            yield out
    rng.shuffle(buf)
    yield from buf


def _pinned(x: torch.Tensor, y: torch.Tensor, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (x.pin_memory(), y.pin_memory()) if pin else (x, y)


def _as_tensors(chunk, label_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    features = feature_matrix(chunk.column(FEATURES_COL), copy=False)  # a view of the block when it can be
    labels = numbers(chunk.column(LABEL_COL))
    with warnings.catch_warnings():
        # Arrow buffers are read-only; the loop never writes to a batch, so a view is safe.
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(features)
        y = torch.from_numpy(labels).to(label_dtype)
    return x, y


# A split is pinned in the object store when it takes at most this share of it; larger ones stream.
MATERIALIZE_SHARE = 0.25


def read_split(path: str, rows: int, feature_dim: int, shuffle_files: bool = False, seed: int = 0):
    """A prepared split: kept in the object store as blocks when it fits (a ``BlockShard``), else a Ray
    Dataset that streams it from Parquet.

    Streaming re-reads and re-decodes the Parquet every epoch, in tasks that compete with the training
    step for the same cores (measured 0.75× of in-memory speed for a CNN on 2 cores, 0.87× materialized).
    Past ``MATERIALIZE_SHARE`` of the object store the split streams, so memory stays bounded; then, with
    ``shuffle_files``, every epoch reads the files in a new order (seeded, reseeded per execution). Block
    order is shuffled by the consumer (``tensor_batches(rng=...)``), stored or streamed.

    Blocks come out in file order (``preserve_order``), never in the order parallel read tasks finish:
    a seeded shuffle of an arrival order is not reproducible, and ``streaming_split`` deals blocks to
    ranks in the order they come (``ShardConfig``).
    """
    import ray
    import ray.data
    from ray.data import FileShuffleConfig

    store = ray.cluster_resources().get("object_store_memory", 0)
    if rows * (feature_dim * 4 + 16) <= MATERIALIZE_SHARE * store:
        return BlockShard.stored(path, rows, feature_dim)
    shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True) if shuffle_files else None
    return _ordered(ray.data.read_parquet(path, shuffle=shuffle))


def _ordered(ds):
    ds.context.execution_options.preserve_order = True
    return ds


def ingest_options():
    """Ray Train's ingest options with ``preserve_order``: ``DataConfig`` applies these to every dataset,
    replacing each one's own; in order, ``streaming_split`` deals the same blocks to the same rank on
    every run (it hands each block to the rank with the fewest rows so far)."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


class ShardConfig(DataConfig):
    """Ray Train's dataset config with two kinds of shard, both in ``preserve_order``.

    ``equal`` datasets (training) are split so that every rank gets the same row count, so DDP step
    counts match (the remainder is dropped). ``disjoint`` ones (val, test) are split so that each block
    goes, whole, to one rank: every row is evaluated by exactly one rank exactly once, streamed or
    materialized, and each rank reads only its own blocks (not the whole split). Row counts then differ
    between ranks by up to a block: evaluation runs ranks in lockstep (``evaluate(pad_input=...)``) and
    all-reduces its sums.

    A split kept in the object store (``read_split``) is dealt out here, once, as fixed lists of blocks
    (``BlockShard.split``); a streamed one goes through ``streaming_split``, whose
    coordinator actor deals blocks as they are read. A single rank takes every dataset whole. Each
    coordinator is a process of its own that Ray must start (one per dataset, ~1 s of CPU each here) inside
    the worker group's start-up, and re-executes a materialized split every epoch; fixed lists need neither.
    """

    def __init__(self, equal: list[str], disjoint: list[str]) -> None:
        super().__init__(datasets_to_split=list(equal), execution_options=ingest_options())
        self._equal = list(equal)
        self._disjoint = list(disjoint)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        fixed = {name: ds for name, ds in datasets.items() if name in (*self._equal, *self._disjoint)
                 and (world_size == 1 or isinstance(ds, BlockShard))}
        rest = {name: ds for name, ds in datasets.items() if name not in fixed and name not in self._disjoint}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        for name, ds in fixed.items():
            if isinstance(ds, BlockShard):
                shards = ds.split(world_size, equal=name in self._equal)
            else:  # one rank streams the whole split
                shards = [self._own_copy(name, ds).iterator()]
            for rank, shard in enumerate(shards):
                output[rank][name] = shard
        for name in self._disjoint:
            if name not in datasets or name in fixed:
                continue
            shards = self._own_copy(name, datasets[name]).streaming_split(world_size, equal=False)
            for rank, shard in enumerate(shards):
                output[rank][name] = shard
        return output

    def _own_copy(self, name: str, ds):
        """``ds`` named and with this config's execution options, as ``DataConfig.configure`` sets them."""
        from ray.data._internal.execution.interfaces.execution_options import ExecutionResources

        ds = ds.copy(ds)
        if ds.name is None:
            ds.set_name(name)
        options = self._get_execution_options(name)
        if options.is_resource_limits_default() and not self._is_v2_autoscaler():
            # As DataConfig.configure does: Ray Data leaves the training workers' CPUs/GPUs alone.
            options.exclude_resources = options.exclude_resources.add(
                ExecutionResources(cpu=self._num_train_cpus, gpu=self._num_train_gpus))
        ds.context.execution_options = options
        return ds


class BlockShard:
    """A split kept in the object store, or a rank's share of one: its blocks, read in order on every pass.

    ``stored`` reads a prepared split's files in name order in this process (pyarrow) and puts them in
    the object store in blocks: no Ray Data read tasks, executor, stats or autoscaling actors (two more
    Python processes to start), which took ~3 s of a run's start-up for the 1,797-row digits and 5–7 s
    for 70,000 × 784 here. ``split`` deals it to ranks: equal row counts (training, the remainder left out)
    or whole blocks (evaluation: every row on exactly one rank). A ``DataIterator`` would start Ray Data's
    streaming executor for every pass (~45 ms, where the blocks take ~5 ms). Offers the one call
    ``tensor_batches`` makes: blocks as Arrow tables (``prefetch_batches`` is accepted for that call and
    not needed: every block is pulled local at the start of a pass). The blocks stay alive while a shard
    holds their refs (Ray's borrower protocol, also for the copies sent to the workers).
    """

    def __init__(self, pieces: list[tuple]) -> None:
        self._pieces = pieces  # (block ref, rows of the block, first row taken, rows taken), in order

    @classmethod
    def stored(cls, path: str, rows: int, feature_dim: int) -> BlockShard:
        """The split's files, in name order and their own row order, as blocks of at most ``BLOCK_BYTES``
        and at least ``MIN_BLOCKS`` per split (the consumer shuffles block order; ranks get whole blocks)."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        import ray

        per_block = max(1, min(-(-rows // MIN_BLOCKS), BLOCK_BYTES // (feature_dim * 4 + 16)))
        pieces = []
        for f in split_files(path):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=per_block):
                pieces.append((ray.put(pa.Table.from_batches([batch])), batch.num_rows, 0, batch.num_rows))
        return cls(pieces)

    @property
    def rows(self) -> int:
        return sum(taken for *_, taken in self._pieces)

    def split(self, world: int, *, equal: bool) -> list[BlockShard]:
        """``world`` shards: with ``equal``, rank r takes rows [r·q, (r+1)·q) of the split's order (q = rows
        // world); else each whole block goes to the rank whose share of the rows holds its middle row."""
        if world == 1:
            return [self]
        total = self.rows
        out: list[list[tuple]] = [[] for _ in range(world)]
        at = 0
        for ref, size, first, taken in self._pieces:
            if equal:
                q = total // world
                for rank in range(world):
                    lo, hi = max(at, rank * q), min(at + taken, (rank + 1) * q)
                    if lo < hi:
                        out[rank].append((ref, size, first + lo - at, hi - lo))
            else:
                out[min(world - 1, (2 * at + taken) * world // (2 * total))].append((ref, size, first, taken))
            at += taken
        return [BlockShard(p) for p in out]

    def iter_batches(self, *, batch_size=None, batch_format: str = "pyarrow", prefetch_batches: int = 0):
        import ray
        from ray.data.block import BlockAccessor

        if batch_size is not None or batch_format != "pyarrow":
            raise ValueError("BlockShard yields whole blocks as Arrow tables "
                             "(batch_size=None, batch_format='pyarrow')")
        refs = list(dict.fromkeys(ref for ref, *_ in self._pieces))
        if refs:  # on a multi-node cluster, start pulling every block here before the first is needed
            ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=True)
        for ref, size, first, taken in self._pieces:
            table = BlockAccessor.for_block(ray.get(ref)).to_arrow()
            yield table if taken == size else table.slice(first, taken)


# A stored split's blocks: small enough to shuffle well and to balance evaluation across ranks.
BLOCK_BYTES = 8 << 20
MIN_BLOCKS = 16


def split_files(path: str) -> list[str]:
    """A prepared split's Parquet files in name order (the order its rows were written in)."""
    from orchard.data.manifest import parquet_files

    return [str(f) for f in parquet_files(path)]
