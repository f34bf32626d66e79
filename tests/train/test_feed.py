"""The Ray Data feed: whole blocks sliced into full batches, every row once, ranks in lockstep."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ROWS, DIM, BATCH = 1000, 3, 64


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    """Row i has features (i, i, i) and label i; uneven files so batches straddle block edges."""
    folder = tmp_path_factory.mktemp("split")
    edges = [0, 130, 131, 500, 777, ROWS]
    for k, (a, b) in enumerate(zip(edges, edges[1:], strict=False)):
        ids = np.arange(a, b)
        feats = pa.FixedSizeListArray.from_arrays(pa.array(np.repeat(ids, DIM).astype(np.float32)), DIM)
        pq.write_table(pa.table({"features": feats, "label": pa.array(ids, pa.int64())}), folder / f"p{k}.parquet")
    return folder


@pytest.fixture(scope="module")
def ray_local():
    from orchard.raystart import start_ray

    start_ray(2)
    yield
    import ray

    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("materialize", [True, False])
def test_every_row_once_in_full_batches(split_folder, ray_local, materialize, monkeypatch):
    from orchard.train import feed

    if not materialize:
        monkeypatch.setattr(feed, "MATERIALIZE_SHARE", 0.0)
    ds = feed.read_split(str(split_folder), ROWS, DIM, shuffle_files=True)
    rng = np.random.default_rng(0)
    orders = []
    for _epoch in range(3):
        batches = list(feed.tensor_batches(ds, BATCH, rng=rng))
        sizes = [len(y) for _, y in batches]
        assert sizes[:-1] == [BATCH] * (len(sizes) - 1) and sizes[-1] == ROWS - BATCH * (len(sizes) - 1)
        labels = torch.cat([y for _, y in batches])
        assert sorted(labels.tolist()) == list(range(ROWS))
        x = torch.cat([x for x, _ in batches])
        assert torch.equal(x[:, 0].long(), labels)  # features stay with their label across block joins
        orders.append(labels.tolist())
    assert len({tuple(o) for o in orders}) > 1, "every epoch saw the blocks in the same order"


def test_block_shuffle_window_bounds_what_is_held(monkeypatch):
    """Past the window, blocks leave the buffer as new ones arrive; each comes out exactly once."""
    from orchard.train import feed

    blocks = [pa.table({"v": pa.array(np.full(100, i, np.int64))}) for i in range(50)]  # 800 bytes each
    pulled = []

    def source():
        for b in blocks:
            pulled.append(b)
            yield b

    out = []
    for b in feed._shuffled(source(), np.random.default_rng(1), window_bytes=4 * 800):
        out.append(b)
        assert len(pulled) - len(out) <= 5  # never more than the window (+1 arriving) held back
    ids = [b.column("v")[0].as_py() for b in out]
    assert sorted(ids) == list(range(50)) and ids != list(range(50))


@pytest.mark.slow
@pytest.mark.parametrize("materialize", [True, False])
def test_blocks_come_in_file_order_on_every_read(split_folder, ray_local, materialize, monkeypatch):
    """Not in the order read tasks finish: a seeded block shuffle of that order would differ run to run."""
    from orchard.train import feed

    if not materialize:
        monkeypatch.setattr(feed, "MATERIALIZE_SHARE", 0.0)
    for _read in range(3):
        ds = feed.read_split(str(split_folder), ROWS, DIM)
        assert isinstance(ds, feed.BlockShard) if materialize else ds.context.execution_options.preserve_order
        labels = torch.cat([y for _, y in feed.tensor_batches(ds, BATCH)])
        assert labels.tolist() == list(range(ROWS))  # files p0..p4 hold rows 0..999 in order


def test_ray_train_ingest_keeps_block_order():
    from orchard.train.feed import ingest_options

    assert ingest_options().preserve_order


def _labels(it) -> list[int]:
    from orchard.train import feed

    return torch.cat([y for _, y in feed.tensor_batches(it, BATCH)]).tolist()


@pytest.mark.slow
@pytest.mark.parametrize(("materialize", "world"), [(True, 2), (True, 1), (False, 1), (False, 2)])
def test_shards_deal_every_row_once(split_folder, ray_local, materialize, world, monkeypatch):
    """Train shards hold equal row counts, val shards whole blocks; each row goes to one rank. A split kept
    in the object store, or any split of a single rank, is dealt without a coordinator actor."""
    from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator

    from orchard.train import feed

    if not materialize:
        monkeypatch.setattr(feed, "MATERIALIZE_SHARE", 0.0)
    ds = {name: feed.read_split(str(split_folder), ROWS, DIM) for name in ("train", "val")}
    shards = feed.ShardConfig(equal=["train"], disjoint=["val"]).configure(ds, world, None, ["n"] * world)
    assert len(shards) == world
    coordinated = [isinstance(s[name], StreamSplitDataIterator) for s in shards for name in ("train", "val")]
    assert not any(coordinated) if (materialize or world == 1) else all(coordinated)
    # A split in the object store is read as its blocks, with no Ray Data executor per pass.
    assert all(isinstance(s[name], feed.BlockShard) == materialize for s in shards for name in ("train", "val"))
    if not materialize and world > 1:
        return  # streaming_split's iterators must be read by all ranks at once: test_eval_exact does that
    train = [_labels(s["train"]) for s in shards]
    assert [_labels(s["train"]) for s in shards] == train  # every pass deals the same rows, in the same order
    val = [_labels(s["val"]) for s in shards]
    assert len({len(t) for t in train}) == 1 and len(train[0]) == ROWS // world
    assert len(set().union(*map(set, train))) == sum(map(len, train))  # no row on two ranks
    assert sorted(sum(val, [])) == list(range(ROWS))
    if world > 1:
        # Each rank's val is whole blocks of the stored split, which keep the files' edges.
        stored = ds["val"]
        starts = np.cumsum([0] + [taken for *_, taken in stored._pieces])
        assert {0, 130, 131, 500, 777} <= set(starts.tolist())
        assert all(v[0] in set(starts.tolist()) for v in val if v)
        assert all(first == 0 and taken == size for s in shards for _, size, first, taken in s["val"]._pieces)
