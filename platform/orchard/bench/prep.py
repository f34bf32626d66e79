"""``orchard bench prep``: ``orchard prep`` against a pandas/pyarrow script doing the same steps, in one run.

Both sides start as fresh processes on the same input file and write the same output layout (one
``fixed_size_list<float32>`` column per split, train/val/test Parquet); each is timed from start to
exit and its peak resident memory is the whole process tree's (Spark's JVM and Python workers
included), sampled every 0.1 s. The baseline does, in one process: read, finite check (malformed and
non-finite rows dropped and counted), exact dedupe, a seeded stratified 70/15/15 split, train-only
standardization, write. It runs under an 18 GiB address-space limit so a size it cannot hold ends as
"out of memory" instead of swapping the machine.

Cases: (a) 70,000 × 784 uint8 image-like Parquet (one column per pixel); (b) 1,000,000 × 64 float CSV
with 0.1% malformed rows; (c) 5M, 20M and 50M rows × 32 float32 columns as Parquet, with
``spark.driver_memory: 2g``, and the growth 50M ÷ 5M (linear is 10). Inputs are written by the bench
under ``.orchard/bench/prep`` once and reused. ``ORCHARD_BENCH_PREP_CASES`` (comma-separated: a, b, c5,
c20, c50) runs a subset.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from orchard.bench import PeakRSS, Result

ROOT = Path(".orchard/bench/prep")
CASES = ("a", "b", "c5", "c20", "c50")
BASELINE_MEMORY = 18 * 2**30


def run(progress: Callable[[str], None] = print) -> list[Result]:
    wanted = [c for c in os.environ.get("ORCHARD_BENCH_PREP_CASES", ",".join(CASES)).split(",") if c]
    results: list[Result] = []
    times: dict[str, float] = {}
    for case in wanted:
        source, label, name, spark = _input(case, progress)
        progress(f"{name}: orchard prep")
        prep_s, prep_mb = _measure(_prep_command(source, label, case, spark))
        progress(f"{name}: orchard prep {prep_s:.1f} s, peak {prep_mb:,.0f} MiB; pandas baseline")
        base_s, base_mb = _measure([sys.executable, "-m", "orchard.bench.prep", source, label,
                                    str(ROOT / "out" / f"{case}-pandas")], memory=BASELINE_MEMORY)
        oom = base_s is None
        progress(f"{name}: pandas " + ("out of memory" if oom else f"{base_s:.1f} s, peak {base_mb:,.0f} MiB"))
        note = "pandas baseline: out of memory (18 GiB limit)" if oom else ""
        results.append(Result(name, "wall time", "s", prep_s, base_s, None if oom else prep_s / base_s, note))
        results.append(Result(name, "peak RSS (process tree)", "MiB", prep_mb, None if oom else base_mb,
                              None if oom else prep_mb / base_mb, note))
        times[case] = prep_s
        shutil.rmtree(ROOT / "out", ignore_errors=True)
    if "c5" in times and "c50" in times:
        results.append(Result("c 50M ÷ 5M rows", "wall-time growth (linear: 10)", "×",
                              times["c50"] / times["c5"]))
    return results


def _measure(command: list[str], memory: int | None = None) -> tuple[float | None, float]:
    """(seconds, peak MiB of the process tree); seconds None when the process failed for memory."""
    def limit() -> None:
        if memory is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    started = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=limit) as proc, \
            PeakRSS(proc.pid) as mem:
        out, _ = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        text = out.decode(errors="replace")
        if memory is not None and ("MemoryError" in text or "out of memory" in text.lower()
                                   or proc.returncode < 0):
            return None, mem.peak / 2**20
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{text[-3000:]}")
    return seconds, mem.peak / 2**20


def _prep_command(source: str, label: str, case: str, spark: dict) -> list[str]:
    out = ROOT / "out" / case
    shutil.rmtree(out, ignore_errors=True)
    spec = {"name": f"bench-prep-{case}", "kind": "train",
            "data": {"source": source, "label": label, "normalize": "standard", "output": str(out),
                     "spark": spark}}
    path = ROOT / f"{case}.json"  # JSON is YAML
    path.write_text(json.dumps(spec))
    orchard = Path(sys.executable).with_name("orchard")
    return [str(orchard), "prep", str(path)]


def _input(case: str, progress) -> tuple[str, str, str, dict]:
    ROOT.mkdir(parents=True, exist_ok=True)
    if case == "a":
        path = ROOT / "a-70000x784-uint8.parquet"
        if not path.exists():
            progress("writing (a) 70,000 × 784 uint8 Parquet")
            _write_images(path, 70_000)
        return str(path), "label", "a 70k×784 uint8 Parquet", {}
    if case == "b":
        path = ROOT / "b-1000000x64-bad0.1pct.csv"
        if not path.exists():
            progress("writing (b) 1,000,000 × 64 CSV with 0.1% malformed rows")
            _write_csv(path, 1_000_000, 64)
        return str(path), "label", "b 1M×64 CSV, 0.1% bad", {}
    rows = int(case[1:]) * 1_000_000
    path = ROOT / f"c-{rows}x32"
    if not (path / "_done").exists():
        progress(f"writing (c) {rows:,} × 32 float Parquet")
        _write_table(path, rows, 32)
    return str(path), "label", f"c {case[1:]}M×32 Parquet", {"driver_memory": "2g"}


def _write_images(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, rows)
    templates = rng.integers(0, 256, (10, 784))
    x = np.clip(templates[y] + rng.normal(0, 40, (rows, 784)), 0, 255).astype(np.uint8)
    table = pa.table({**{f"p{i}": x[:, i] for i in range(784)}, "label": y})
    pq.write_table(table, path)


def _write_csv(path: Path, rows: int, dim: int) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(1)
    names = [f"x{i}" for i in range(dim)]
    bad_kinds = [b"1.0,2.0", b"abc", b"nan"]  # too few fields, non-numeric first field, non-finite first field
    with open(path, "wb") as fh:
        fh.write((",".join([*names, "label"]) + "\n").encode())
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            y = rng.integers(0, 10, n)
            x = np.round(rng.normal(0, 1, (n, dim)) + y[:, None] * 0.1, 4)  # ~546 MB in all, as in the issue
            buf = io.BytesIO()
            pacsv.write_csv(pa.table({**{c: x[:, i] for i, c in enumerate(names)}, "label": y}), buf,
                            pacsv.WriteOptions(include_header=False))
            lines = buf.getvalue().split(b"\n")
            for k, i in enumerate(rng.choice(n, n // 1000, replace=False)):
                kind = bad_kinds[k % 3]
                lines[i] = kind if kind.startswith(b"1.0") else kind + lines[i][lines[i].index(b","):]
            fh.write(b"\n".join(lines))


def _write_table(path: Path, rows: int, dim: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    rng = np.random.default_rng(2)
    centers = rng.normal(0, 1, (10, dim)).astype(np.float32)
    per_file = 2_500_000
    for f, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        y = rng.integers(0, 10, n)
        x = centers[y] + rng.normal(0, 1.5, (n, dim)).astype(np.float32)
        pq.write_table(pa.table({**{f"x{i}": x[:, i] for i in range(dim)}, "label": y}),
                       path / f"part-{f:04d}.parquet", row_group_size=500_000)
    (path / "_done").touch()


def baseline(source: str, label: str, out: str) -> dict[str, int]:
    """The pandas/pyarrow side: the same steps in one process; returns its counts."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    bad = 0
    if source.endswith(".csv"):
        def skip(row) -> str:
            nonlocal bad
            bad += 1
            return "skip"

        table = pacsv.read_csv(source, parse_options=pacsv.ParseOptions(invalid_row_handler=skip),
                               convert_options=pacsv.ConvertOptions(column_types={label: pa.string()},
                                                                    strings_can_be_null=True))
        names = [c for c in table.column_names if c != label]
        x = np.column_stack([pd.to_numeric(table[c].to_pandas(), errors="coerce").to_numpy(np.float64)
                             for c in names])
    else:
        table = pq.read_table(source)
        names = [c for c in table.column_names if c != label]
        x = np.column_stack([table[c].to_numpy().astype(np.float64) for c in names])
    y = table[label].to_pandas()
    del table
    ok = np.isfinite(x).all(axis=1) & y.notna().to_numpy()
    bad += int((~ok).sum())
    x, y = x[ok], pd.factorize(y[ok], sort=True)[0]
    frame = pd.DataFrame(x)
    frame["_y"] = y
    keep = ~frame.duplicated().to_numpy()
    del frame
    x, y = x[keep], y[keep]
    rng = np.random.default_rng(0)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        a, b = round(len(idx) * 0.7), round(len(idx) * 0.85)
        parts["train"].append(idx[:a]), parts["val"].append(idx[a:b]), parts["test"].append(idx[b:])
    split = {k: rng.permutation(np.concatenate(v)) for k, v in parts.items()}
    mean, std = x[split["train"]].mean(axis=0), x[split["train"]].std(axis=0)
    std[std == 0] = 1.0
    counts = {"bad": bad, "duplicates": int((~keep).sum())}
    for name, idx in split.items():
        z = ((x[idx] - mean) / std).astype(np.float32)
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        features = pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), z.shape[1])
        pq.write_table(pa.table({"features": features, "label": y[idx]}), folder / "part-00000.parquet")
        counts[name] = len(idx)
    return counts


if __name__ == "__main__":
    print(json.dumps(baseline(*sys.argv[1:4])))
