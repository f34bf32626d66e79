"""The prepared-data cache is safe: a killed prep leaves nothing reusable, two preps of one spec agree,
and a folder whose files no longer match its manifest is rebuilt instead of trained on."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from orchard.config import validate_spec
from orchard.data import load_manifest, prepare
from orchard.data.manifest import SPLITS, verify
from orchard.data.prepare import _reusable, prepared_path
from orchard.data.synthetic import write_prepared
from orchard.data.write import OWNER, exclusive, staging, sweep
from tests.data.prep_helpers import row_set, write_csv

ROOT = Path(__file__).resolve().parents[2]


def _synthetic(path: Path):
    x = np.arange(240, dtype=np.float32).reshape(60, 4)
    return write_prepared(path, x, np.arange(60) % 3, {"train": slice(0, 40), "val": slice(40, 50),
                                                       "test": slice(50, 60)})


def _flip_a_byte(f: Path) -> None:
    chunk = pq.read_metadata(f).row_group(0).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(f.read_bytes())
    data[start + chunk.total_compressed_size // 2] ^= 0xFF  # in the column data: size and footer unchanged
    f.write_bytes(bytes(data))


# -- verify, on folders written without Spark ------------------------------------------------------------

def test_manifest_lists_every_file_and_an_untouched_folder_verifies(tmp_path):
    prepared = _synthetic(tmp_path / "p")
    records = prepared.manifest["files"]
    assert [r["path"] for r in records] == sorted(
        p.relative_to(prepared.path).as_posix() for p in prepared.path.rglob("*.parquet"))
    assert sum(r["rows"] for r in records) == 60
    assert all(r["bytes"] == (prepared.path / r["path"]).stat().st_size for r in records)
    assert verify(prepared, full=True) == []


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-100]), "bytes, the manifest says"),
        (lambda f: f.unlink(), "missing"),
        (lambda f: pq.write_table(pq.read_table(f).slice(0, 3), f), "the manifest says"),
        (lambda f: f.with_name("part-00009.parquet").write_bytes(f.read_bytes()), "not listed in the manifest"),
    ],
    ids=["truncated", "deleted", "rewritten", "extra-file"],
)
def test_verify_names_the_file_that_no_longer_matches(tmp_path, damage, expected):
    prepared = _synthetic(tmp_path / "p")
    damage(prepared.path / "train" / "part-00001.parquet")
    problems = verify(prepared, full=False)
    assert len(problems) == 1 and problems[0].startswith("train/part-0000") and expected in problems[0]


def test_a_same_size_edit_is_found_by_the_hash_only(tmp_path, monkeypatch):
    prepared = _synthetic(tmp_path / "p")
    _flip_a_byte(prepared.path / "val" / "part-00000.parquet")
    assert verify(prepared, full=False) == []
    assert "content hash" in verify(prepared, full=True)[0]
    monkeypatch.setenv("ORCHARD_VERIFY_DATA", "quick")
    assert verify(prepared) == []
    monkeypatch.setenv("ORCHARD_VERIFY_DATA", "auto")  # a small folder is hashed
    assert verify(prepared) != []


def test_a_manifest_without_files_still_gets_its_row_counts_checked(tmp_path):
    prepared = _synthetic(tmp_path / "p")
    manifest = {k: v for k, v in prepared.manifest.items() if k != "files"}
    (prepared.path / "manifest.json").write_text(json.dumps(manifest))
    assert verify(load_manifest(prepared.path)) == []
    (prepared.path / "test" / "part-00000.parquet").unlink()
    assert verify(load_manifest(prepared.path)) == ["test: 1 files with 5 rows, the manifest counts 10"]


def test_a_torn_manifest_makes_the_folder_unreusable_with_a_warning(tmp_path, caplog):
    prepared = _synthetic(tmp_path / "p")
    assert _reusable(prepared.path) is not None
    (prepared.path / "manifest.json").write_text('{"version": 1, "files": [')
    with caplog.at_level(logging.WARNING, logger="orchard.data"):
        assert _reusable(prepared.path, warn=True) is None
    assert "unreadable manifest.json" in caplog.text


# -- locks and leftovers ------------------------------------------------------------------------------

def test_sweep_removes_a_dead_preps_staging_folder_and_keeps_a_live_one(tmp_path):
    target = tmp_path / "out" / "digits-abc"
    dead = target.parent / f".{target.name}.tmp-dead0000"
    (dead / "_spark").mkdir(parents=True)
    (dead / OWNER).write_text("pid 1 on elsewhere\n")  # nobody holds its lock
    aside = target.parent / f".{target.name}.bad-0000"
    aside.mkdir()
    other = target.parent / ".digits-other.tmp-00000000"
    other.mkdir()
    with staging(target) as live:
        assert sorted(sweep(target)) == sorted([dead, aside])
        assert live.is_dir() and other.is_dir()
    assert not live.exists()


def test_exclusive_admits_one_holder_at_a_time_and_leaves_no_lock_file(tmp_path):
    target = tmp_path / "digits-abc"
    order: list[str] = []
    with exclusive(target):
        waiter = threading.Thread(target=lambda: _hold(target, order))
        waiter.start()
        time.sleep(0.5)
        order.append("first done")
    waiter.join(10)
    assert order == ["first done", "second in"]
    assert list(tmp_path.iterdir()) == []


def _hold(target: Path, order: list[str]) -> None:
    with exclusive(target):
        order.append("second in")


# -- prepare, with Spark -------------------------------------------------------------------------------

def test_a_truncated_split_file_is_warned_about_and_rebuilt_in_place(spark, make_spec, caplog):
    first = prepare(make_spec(normalize="none"))
    rows = {split: row_set(first, split) for split in SPLITS}
    bad = first.path / "train" / "part-00000.parquet"
    bad.write_bytes(bad.read_bytes()[:-64])
    with caplog.at_level(logging.WARNING, logger="orchard.data"):
        second = prepare(make_spec(normalize="none"))
    assert not second.reused and second.path == first.path
    assert "train/part-00000.parquet" in caplog.text and "bytes, the manifest says" in caplog.text
    assert verify(second, full=True) == []
    assert {split: row_set(second, split) for split in SPLITS} == rows
    assert second.manifest["counts"] == first.manifest["counts"]
    assert sorted(p.name for p in first.path.parent.iterdir()) == [first.path.name]


def test_a_same_size_edit_is_rebuilt_by_default_and_reused_only_under_quick(spark, make_spec, monkeypatch):
    first = prepare(make_spec(normalize="none"))
    _flip_a_byte(first.path / "test" / "part-00001.parquet")
    monkeypatch.setenv("ORCHARD_VERIFY_DATA", "quick")
    assert prepare(make_spec(normalize="none")).reused
    monkeypatch.delenv("ORCHARD_VERIFY_DATA")
    again = prepare(make_spec(normalize="none"))
    assert not again.reused and verify(again, full=True) == []


def test_a_folder_without_manifest_at_the_target_path_is_replaced(spark, make_spec):
    spec = make_spec(source="sklearn:breast_cancer")
    target = prepared_path(spec)
    (target / "train").mkdir(parents=True)
    (target / "train" / "part-00000.parquet").write_bytes(b"PAR1 torn")
    prepared = prepare(spec)
    assert not prepared.reused and prepared.path == target and verify(prepared, full=True) == []
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


# -- real `orchard prep` processes --------------------------------------------------------------------

def _spec_file(tmp_path: Path, rows: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(rows, 8)).round(4)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0).astype(int)
    csv = write_csv(tmp_path / "source.csv", [f"f{i}" for i in range(8)] + ["label"],
                    [[*row, int(label)] for row, label in zip(x.tolist(), y, strict=True)])
    spec = {"name": "atomic", "kind": "train",
            "data": {"source": str(csv), "output": str(tmp_path / "prepared"),
                     "spark": {"master": "local[2]", "shuffle_partitions": 2}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, prepared_path(validate_spec(spec))


def _orchard_prep(spec: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    return subprocess.Popen([sys.executable, "-m", "orchard.cli", "prep", str(spec)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _gone(pgid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_prep_killed_mid_write_leaves_nothing_reusable_and_the_next_prep_cleans_up(spark, tmp_path):
    spec, target = _spec_file(tmp_path, rows=30000)
    proc = _orchard_prep(spec, tmp_path)
    staged: list[Path] = []
    deadline = time.monotonic() + 240
    try:
        while not staged and proc.poll() is None and time.monotonic() < deadline:
            staged = list(target.parent.glob(f".{target.name}.tmp-*/**/*.parquet"))
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its JVM, mid-write
    output = proc.communicate()[0]
    assert staged, f"the prep ended before writing Parquet:\n{output}"
    assert _gone(proc.pid)
    assert not target.exists()
    leftovers = list(target.parent.glob(f".{target.name}.tmp-*"))
    assert len(leftovers) == 1

    prepared = prepare(validate_spec(yaml.safe_load(spec.read_text())))
    assert not prepared.reused and prepared.path == target
    assert verify(prepared, full=True) == []
    counts = prepared.manifest["counts"]
    assert counts["input"] == 30000 and counts["train"] + counts["val"] + counts["test"] + counts[
        "duplicates"] == 30000
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # the dead run's folder is gone


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_concurrent_preps_of_one_spec_both_succeed_with_one_complete_folder(tmp_path):
    spec, target = _spec_file(tmp_path, rows=3000)
    procs = [_orchard_prep(spec, tmp_path) for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=280)[0] for p in procs]
    finally:
        for p in procs:  # a hung prep must not outlive the test (its JVM included)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    states = sorted("written" if "prepared data written" in o else "reused" if "prepared data reused" in o
                    else o for o in outputs)
    assert states == ["reused", "written"]
    assert all(str(target) in " ".join(o.split()) for o in outputs)
    prepared = load_manifest(target)
    assert verify(prepared, full=True) == [] and prepared.manifest["counts"]["input"] == 3000
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
