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
    from orchard.train.launcher import init_ray

    init_ray(2)
    yield
    import ray

    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("materialize", [True, False])
def test_every_row_once_in_full_batches(split_folder, ray_local, materialize, monkeypatch):
    from orchard.train import feed

    if not materialize:
        monkeypatch.setattr(feed, "MATERIALIZE_SHARE", 0.0)
    ds = feed.read_split(str(split_folder), ROWS, DIM, shuffle_blocks=True)
    batches = list(feed.tensor_batches(ds, BATCH))
    sizes = [len(y) for _, y in batches]
    assert sizes[:-1] == [BATCH] * (len(sizes) - 1) and sizes[-1] == ROWS - BATCH * (len(sizes) - 1)
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == list(range(ROWS))
    x = torch.cat([x for x, _ in batches])
    assert torch.equal(x[:, 0].long(), labels)  # features stay with their label across block joins


@pytest.mark.slow
def test_rank_slices_partition_the_batches(split_folder, ray_local):
    from orchard.train.feed import read_split, tensor_batches

    ds = read_split(str(split_folder), ROWS, DIM)
    world = 3
    per_rank = [list(tensor_batches(ds, BATCH, rank_slice=(r, world))) for r in range(world)]
    seen = sorted(int(v) for b in per_rank for _, y in b for v in y)
    assert seen == list(range(ROWS))
    counts = [len(b) for b in per_rank]
    assert max(counts) - min(counts) <= 1
