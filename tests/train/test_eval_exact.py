"""Validation and test through real Ray Train workers count every row once, streamed or materialized.

Every val/test row has its own class (its label is its row id), so the test confusion matrix's row
sums count how often each row was evaluated: exactly once each, on any number of workers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchard.config import JobSpec
from orchard.data.manifest import load_manifest, read_split
from orchard.data.synthetic import write_prepared
from orchard.engine import evaluate
from orchard.train import run_training

pytestmark = pytest.mark.slow
EVAL_ROWS, TRAIN_ROWS, DIM, FILES = 301, 480, 6, 7  # 301 rows in 7 files: uneven blocks, batches straddle them


def _write(root, eval_rows: int, files: int):
    """val and test rows 0..eval_rows-1 labelled with their own id; train rows draw from the same classes."""
    rng = np.random.default_rng(3)
    ids, classes = np.arange(eval_rows), max(eval_rows, 4)
    y = np.concatenate([rng.integers(0, classes, TRAIN_ROWS), ids, ids]).astype(np.int64)
    x = rng.normal(size=(len(y), DIM)).astype(np.float32)
    x[:, 0] = y / classes  # one feature carries the label, so the model gets some rows right
    n = TRAIN_ROWS + eval_rows
    splits = {"train": slice(0, TRAIN_ROWS), "val": slice(TRAIN_ROWS, n), "test": slice(n, n + eval_rows)}
    write_prepared(root / "prepared", x, y, splits, files=files)
    return load_manifest(root / "prepared")


@pytest.fixture(scope="module")
def id_labelled(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("ids"), EVAL_ROWS, FILES)


@pytest.fixture(scope="module")
def one_row(tmp_path_factory):
    """One val and one test row, so one block each: the other rank gets no val or test rows at all."""
    return _write(tmp_path_factory.mktemp("one"), 1, 1)


def _spec(tmp_path, strategy: str, cache: str = "none", norm: str = "none") -> JobSpec:
    return JobSpec.model_validate({
        "name": "test-eval-exact", "kind": "train",
        "model": {"family": "mlp", "hidden": [32], "norm": norm},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.01, "seed": 5, "cache": cache},
        "scaling": {"num_workers": 2, "use_gpu": False, "strategy": strategy,
                    "storage_path": str(tmp_path / "ray")},
    })


def _plain(model, prepared, split: str):
    """One process, one batch holding every row of ``split``."""
    x, y = (torch.from_numpy(a) for a in read_split(prepared, split))
    return evaluate(model, [(x, y)], torch.device("cpu"), prepared.manifest["num_classes"])


def _assert_every_row_once_with_plain_figures(result, prepared):
    rows = prepared.manifest["counts"]["test"]
    per_row = result.confusion.sum(axis=1)[:rows]  # true label == row id
    assert result.confusion.sum() == rows
    assert per_row.tolist() == [1] * rows, f"rows seen twice: {np.flatnonzero(per_row > 1).tolist()}, " \
                                           f"never: {np.flatnonzero(per_row == 0).tolist()}"

    # The same figures as one process evaluating the returned (last epoch's) weights on every row.
    test = _plain(result.model, prepared, "test")
    assert np.array_equal(result.confusion, test.confusion)
    assert result.test["test/loss"] == pytest.approx(test.loss, rel=1e-5)
    assert result.test["test/accuracy"] == pytest.approx(test.accuracy, abs=1e-9)
    assert test.accuracy > 0 or rows == 1  # a model right on some rows, where row sets can differ in figures
    val = _plain(result.model, prepared, "val")
    assert result.history[-1]["val/loss"] == pytest.approx(val.loss, rel=1e-5)
    assert result.history[-1]["val/accuracy"] == pytest.approx(val.accuracy, abs=1e-9)


@pytest.mark.parametrize(("strategy", "streamed"), [("ddp", True), ("fsdp", True), ("ddp", False)],
                         ids=["ddp-streamed", "fsdp-streamed", "ddp-materialized"])
def test_two_workers_evaluate_every_val_and_test_row_exactly_once(id_labelled, tmp_path, monkeypatch,
                                                                  strategy, streamed):
    from orchard.train import feed

    if streamed:  # the driver's read_split then streams every split instead of pinning it
        monkeypatch.setattr(feed, "MATERIALIZE_SHARE", 0.0)
    result = run_training(_spec(tmp_path, strategy), id_labelled)
    _assert_every_row_once_with_plain_figures(result, id_labelled)


def test_a_rank_without_eval_rows_keeps_step_with_one_that_has_them(one_row, tmp_path):
    """One val and one test row: a rank evaluates nothing, caches its empty val shard like rank 0 caches its
    whole one, and forwards dummy rows while rank 0 works (DDP's first eval forward broadcasts the
    BatchNorm buffers: a rank that skipped it would hang or mismatch the next collective)."""
    result = run_training(_spec(tmp_path, "ddp", cache="auto", norm="batch"), one_row)  # epoch 2 replays val
    _assert_every_row_once_with_plain_figures(result, one_row)
