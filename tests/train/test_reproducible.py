"""The same spec and seed, run twice through Ray Train and Ray Data, gives the same model and figures."""

import pytest

from orchard.config import JobSpec
from orchard.train import run_training

pytestmark = pytest.mark.slow


def _spec(tmp_path, run: int, workers: int) -> JobSpec:
    return JobSpec.model_validate({
        "name": "test-repeat", "kind": "train",
        # Dropout draws from each rank's seeded stream; 3 epochs replay the epoch cache twice.
        "model": {"family": "mlp", "hidden": [64], "dropout": 0.2},
        "train": {"epochs": 3, "batch_size": 32, "optimizer": "adamw", "lr": 0.003, "seed": 7},
        "scaling": {"num_workers": workers, "use_gpu": False, "storage_path": str(tmp_path / f"ray{run}")},
    })


@pytest.mark.parametrize("workers", [1, 2])
def test_two_runs_of_one_spec_and_seed_give_identical_weights_and_test_metrics(workers, digits_prepared, tmp_path):
    first, second = (run_training(_spec(tmp_path, run, workers), digits_prepared) for run in (0, 1))

    assert first.test == second.test  # exactly, not approximately
    assert [h["val/loss"] for h in first.history] == [h["val/loss"] for h in second.history]
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name
