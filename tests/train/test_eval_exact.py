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


@pytest.fixture(scope="module")
def id_labelled(tmp_path_factory):
    """val and test rows 0..300 labelled with their own id; train rows draw from the same 301 classes."""
    rng = np.random.default_rng(3)
    ids = np.arange(EVAL_ROWS)
    y = np.concatenate([rng.integers(0, EVAL_ROWS, TRAIN_ROWS), ids, ids]).astype(np.int64)
    x = rng.normal(size=(len(y), DIM)).astype(np.float32)
    x[:, 0] = y / EVAL_ROWS  # one feature carries the label, so the model gets some rows right
    n = TRAIN_ROWS + EVAL_ROWS
    splits = {"train": slice(0, TRAIN_ROWS), "val": slice(TRAIN_ROWS, n), "test": slice(n, n + EVAL_ROWS)}
    path = tmp_path_factory.mktemp("ids") / "prepared"
    write_prepared(path, x, y, splits, files=FILES)
    return load_manifest(path)


def _spec(tmp_path, strategy: str) -> JobSpec:
    return JobSpec.model_validate({
        "name": "test-eval-exact", "kind": "train",
        "model": {"family": "mlp", "hidden": [32]},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.01, "seed": 5, "cache": "none"},
        "scaling": {"num_workers": 2, "use_gpu": False, "strategy": strategy,
                    "storage_path": str(tmp_path / "ray")},
    })


def _plain(model, prepared, split: str):
    """One process, one batch holding every row of ``split``."""
    x, y = (torch.from_numpy(a) for a in read_split(prepared, split))
    return evaluate(model, [(x, y)], torch.device("cpu"), prepared.manifest["num_classes"])


@pytest.mark.parametrize(("strategy", "streamed"), [("ddp", True), ("fsdp", True), ("ddp", False)],
                         ids=["ddp-streamed", "fsdp-streamed", "ddp-materialized"])
def test_two_workers_evaluate_every_val_and_test_row_exactly_once(id_labelled, tmp_path, monkeypatch,
                                                                  strategy, streamed):
    from orchard.train import feed

    if streamed:  # the driver's read_split then streams every split instead of pinning it
        monkeypatch.setattr(feed, "MATERIALIZE_SHARE", 0.0)
    result = run_training(_spec(tmp_path, strategy), id_labelled)

    per_row = result.confusion.sum(axis=1)  # true label == row id
    assert per_row.shape == (EVAL_ROWS,)
    assert per_row.tolist() == [1] * EVAL_ROWS, f"rows seen twice: {np.flatnonzero(per_row > 1).tolist()}, " \
                                                f"never: {np.flatnonzero(per_row == 0).tolist()}"

    # The same figures as one process evaluating the returned (last epoch's) weights on every row.
    test = _plain(result.model, id_labelled, "test")
    assert np.array_equal(result.confusion, test.confusion)
    assert result.test["test/loss"] == pytest.approx(test.loss, rel=1e-5)
    assert result.test["test/accuracy"] == pytest.approx(test.accuracy, abs=1e-9)
    assert test.accuracy > 0  # not a model that gets every row wrong, which any split would match
    val = _plain(result.model, id_labelled, "val")
    assert result.history[-1]["val/loss"] == pytest.approx(val.loss, rel=1e-5)
    assert result.history[-1]["val/accuracy"] == pytest.approx(val.accuracy, abs=1e-9)
