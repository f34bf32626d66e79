"""Rewriting Spark's staged split into contract files holds a few row groups at a time, whatever the size.

pyarrow's ParquetFile pre-buffers by default, and iter_batches then keeps every row group of a file it has
read: at 50M rows the driver held a whole staged train file (4.7 GiB) in the last phase of `orchard prep`.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchard.data.manifest import FEATURES_COL, LABEL_COL

ROWS, DIM = 2_000_000, 32  # 256 MiB of float32 features


def _stage(folder) -> None:
    """One staged file as Spark writes it: features packed into binary (float32, little-endian)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, DIM), dtype=np.float32)
    offsets = pa.py_buffer((np.arange(ROWS + 1, dtype=np.int32) * DIM * 4).tobytes())
    packed = pa.Array.from_buffers(pa.binary(), ROWS, [None, offsets, pa.py_buffer(x.tobytes())])
    labels = pa.array(rng.integers(0, 10, ROWS))
    pq.write_table(pa.table({FEATURES_COL: packed, LABEL_COL: labels}), folder / "part-00000.parquet",
                   row_group_size=65_536)


def test_a_large_staged_split_is_rewritten_in_bounded_memory(tmp_path):
    staged, out = tmp_path / "staged", tmp_path / "out"
    _stage(staged)
    # A fresh process, so that Arrow's pool high-water mark is this rewrite's alone.
    code = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        import pyarrow as pa
        from orchard.data.write import finish_split
        rows = finish_split(Path({str(staged)!r}), Path({str(out)!r}), {DIM}, files=4)
        print(json.dumps({{"rows": rows, "peak": pa.default_memory_pool().max_memory()}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == ROWS
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("part-*.parquet")) == ROWS
    assert result["peak"] < 64 * 2**20, result["peak"] / 2**20
